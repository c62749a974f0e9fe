"""Step distill: D2DMoE's first stage for attention, each projection (q, k, v, o) of the fine-tuned
model replaced by a two-layer ReLU MLP that reproduces it.

Records every projection's inputs and outputs on a seeded sample of training tokens in one pass of
the dense model (so each MLP learns from the dense model's own inputs, layer by layer, backbone
frozen), holds out whole texts for early stopping, and trains each MLP with MSE
(moefy.adapters.attention.distill). Writes <out>/ as a model folder: the fine-tuned model's files,
projections.safetensors (the MLPs) and distillation.json (per projection: width, held-out MSE
before and after, R^2, epochs, best epoch, stopped_at_cap), also logged to MLflow. Later steps load
it like any model and see the MLPs as FFNs. Projections whose last epoch had the best held-out MSE
stopped at max_epochs while still improving (moefy.training.convergence): distillation.json counts
them (stopped_at_cap), the log warns once, and the model's training.json names the stage for the
evaluate step's records and the report.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from moefy import dist
from moefy.adapters.attention import find_projections
from moefy.adapters.models import TRAINING_FILE, load_model, load_tokenizer, read_training, save_model
from moefy.conversion.distillation import DistillSettings, distill, svd_start, width_for
from moefy.data.batches import Encoded, choose_texts, iterate, length_grouped_batches
from moefy.data.subsets import read_subset
from moefy.files import atomic_dir, write_json
from moefy.training import convergence
from moefy.workflow import tracking
from moefy.workflow.cli import ablation, add_section_flags, run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser("distill_attention", __doc__, "model", "task", "penalty", "seed", "device", out="output model folder")
    parser.add_argument("--data", required=True, type=Path, help="folder with train.jsonl")
    parser.add_argument(
        "--width-multiple",
        type=int,
        default=1,
        help="round each MLP's width up to a multiple of this (the workflow passes the grid's expert counts' lcm, so every count divides it)",
    )
    add_section_flags(parser, "distill_attention")
    args = parser.parse_args(argv)
    if args.width_multiple < 1:
        parser.error(f"--width-multiple {args.width_multiple}: must be at least 1")
    return args


def record_pairs(model, projections, encoded, batches, ctx) -> dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """Per projection key: (text position, inputs [n, d_in], outputs [n, d_out]) of every real token."""
    pairs: dict[str, list] = {p.key: [] for p in projections}
    current: dict[str, tuple] = {}
    handles = [
        p.linear.register_forward_hook(lambda m, args, out, key=p.key: current.__setitem__(key, (args[0], out)))
        for p in projections
    ]
    try:
        for idx, inputs, _ in iterate(model, encoded, batches, ctx, "distill: recording"):
            real = inputs["attention_mask"].bool()
            for key, (x, y) in current.items():
                for row, position in enumerate(idx):
                    pairs[key].append((int(position), x[row][real[row]].detach().cpu(), y[row][real[row]].detach().cpu()))
    finally:
        for handle in handles:
            handle.remove()
    return pairs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = dist.setup(args.device)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, args.task).to(ctx.device).eval()
    projections = find_projections(model)
    texts, _ = read_subset(args.data / "train.jsonl")
    chosen, _ = choose_texts(Encoded(tokenizer, texts).lengths, args.max_tokens, args.max_tokens, args.seed)
    encoded = Encoded(tokenizer, [texts[i] for i in chosen])
    held_out = set(range(max(1, round(args.heldout_fraction * len(encoded)))))  # chosen in a seeded order already
    settings = DistillSettings(args.learning_rate, args.token_batch_size, args.max_epochs, args.patience)
    batches = length_grouped_batches(encoded.lengths, args.batch_size)
    with tracking.job_run("distill_attention", vars(args), ablation(args), enabled=ctx.is_main) as run:
        with torch.no_grad():
            pairs = record_pairs(model, projections, encoded, batches, ctx)
        report = {}
        for projection in tqdm(projections, desc="distilling projections", unit="projection", disable=not ctx.is_main):
            parts = pairs.pop(projection.key)

            def stacked(keep, parts=parts):
                kept = [(x, y) for position, x, y in parts if keep(position)]
                return torch.cat([x for x, _ in kept]).to(ctx.device), torch.cat([y for _, y in kept]).to(ctx.device)

            linear = projection.linear
            d_out, d_in = linear.weight.shape
            mlp = svd_start(linear, width_for(d_in, d_out, args.flops_factor, args.width_multiple))
            with torch.enable_grad():
                result = distill(mlp, stacked(lambda p: p not in held_out), stacked(lambda p: p in held_out), settings, args.seed)
            projection.replace(mlp.eval().requires_grad_(False))
            report[projection.key] = {"width": mlp.width, **vars(result)}
            tqdm.write(f"{projection.key}: width {mlp.width}, held-out R^2 {result.r2:.4f} after {result.epochs} epochs")
            if ctx.is_main:
                run.log_metrics({f"r2/{projection.key}": result.r2, f"mse/{projection.key}": result.mse})
        capped = [key for key, entry in report.items() if entry[convergence.KEY]]
        if ctx.is_main:
            training = read_training(args.model)
            if capped:
                stage = f"attention distillation {len(capped)}/{len(report)} projections"
                print(
                    convergence.warning(f"{stage} ({', '.join(capped)})", f"distill_attention.max_epochs {args.max_epochs}"),
                    flush=True,
                )
                training = convergence.note(training, stage)
            with atomic_dir(args.out) as folder:  # a stopped job leaves no half-written model behind
                save_model(model, tokenizer, folder)
                if training:
                    write_json(folder / TRAINING_FILE, training)
                summary = {"tokens": int(encoded.lengths.sum()), convergence.KEY: len(capped), "projections": report}
                write_json(folder / "distillation.json", summary)
    dist.teardown()


if __name__ == "__main__":
    run_step(main)
