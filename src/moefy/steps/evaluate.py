"""Step evaluate: swap every FFN for its MoE and measure the task metric at each expert budget.

Selection rules: top-k at each budget (round(budget * E) experts per token, shared experts
among them), in each allocation of --allocations (uniform: the same k routed experts in every
layer; sensitivity: as many in all, spread over the layers by the router step's error curves),
and dynamic-k at each threshold tau (every expert whose router contribution is at least (1 - tau) * the token's
largest). For each it records the test metric (accuracy, or perplexity for causal_lm), the same
relative to the dense model, the share of predictions equal to the dense model's (each text's
class, or each position's argmax next token: less noisy than the metric on a small test set),
experts per token (mean and spread over real tokens), the FFN FLOPs fraction including the
router, and the measured wall-clock of all FFNs over the test set: the MoE (only picked experts
computed, router included) against the same weights run dense. The dense model is the MoE with
every expert, measured here on the same batches. Test texts are sharded over ranks; sums are
added. With --second-test (causal_lm), every rule is also measured on a second corpus's texts
(second_test_perplexity, and relative to the dense model on them). A router file with softmax gates
(softmax-gated recovery) weighs every pick, at every budget, against the --reference model run
dense. Writes one JSON file: a list of records, each naming its place in the grid (penalty, seed,
split, num_experts, router), the precision the model was fine-tuned in, the test set's size
(test_count: texts, or predicted tokens for causal_lm) and stopped_at_cap: the training stages of
this model and router that stopped at their cap while still improving ("" when none did; from the
model's training.json and the router file's metadata, moefy.training.convergence). With
--precision bf16 the dense model and the MoE run in bfloat16 (the same weights, rounded), the
kernels are chosen from the calibration's bf16 tables, and each record adds the fp32 dense model's
metric and the share of the bf16 dense model's predictions equal to its (inference_precision says
which; records of fp32 runs have neither).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moefy import dist, native
from moefy.adapters.models import load_model, load_tokenizer, read_training
from moefy.adapters.tasks import get_task
from moefy.config import ALLOCATIONS
from moefy.data.batches import Encoded, eval_batches
from moefy.data.subsets import read_subset
from moefy.errors import MoefyError
from moefy.files import read_json, tensors_metadata, write_json
from moefy.measure.evaluation import PRECISIONS, SelectionRule, logged_metrics, record, run_pass, selection_rules
from moefy.measure.flops import model_flops
from moefy.moe.checkpoints import read_error_curves, read_gates, read_moe_parts
from moefy.moe.kernel_choice import KernelTable, layer_shape_key, table_for
from moefy.moe.layer import MoEFFN, moefy_model
from moefy.training import convergence
from moefy.workflow import pause, tracking
from moefy.workflow.cli import CONVERSION_FLAGS, ablation, add_section_flags, run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser(
        "evaluate",
        __doc__,
        "model",
        "task",
        *CONVERSION_FLAGS,
        "recovery",
        "device",
        out="output JSON file",
    )
    parser.add_argument(
        "--allocations",
        nargs="+",
        choices=ALLOCATIONS,
        default=["uniform"],
        help="how each budget's routed experts are spread over layers (sensitivity: by the router file's error curves)",
    )
    parser.add_argument("--data", required=True, type=Path, help="folder with test.jsonl")
    parser.add_argument("--labels", required=True, type=Path, help="balance/<variant>/<split>-E<E>/labels.safetensors")
    parser.add_argument(
        "--router-file", required=True, type=Path, help="router/<variant>/<split>-E<E>-<router>/router.safetensors"
    )
    parser.add_argument(
        "--kernels",
        type=Path,
        help="calibrate/moe_kernels.json: the MoE kernels measured fastest here (without it, fixed rules choose)",
    )
    parser.add_argument(
        "--reference",
        help="the dense model the relative numbers compare with, when --model is not it (a recovered model: its fine-tuned model)",
    )
    parser.add_argument(
        "--second-test", type=Path, help="causal_lm: data/second_test.jsonl, a second corpus also measured (step second_corpus)"
    )
    add_section_flags(parser, "evaluate")
    return parser.parse_args(argv)


def choose_kernels(args, layers: list[MoEFFN]) -> None:
    """Give each MoE layer the calibrate step's kernel table for its shape (the FFNs share one;
    distilled projections have their own). Without the file, or for a shape the grid did not
    calibrate (an ablation asked for by file name), fixed kernel rules choose."""
    if args.kernels is None:
        return
    document = read_json(args.kernels)
    tables: dict[str, KernelTable | None] = {}
    for layer in layers:
        key = layer_shape_key(layer)
        if key not in tables:
            if key in document.get("shapes", {}):
                tables[key] = table_for(document, key, str(args.kernels))
            else:
                tables[key] = None
                print(f"{args.kernels} has no kernel table for {key} (not in the grid): fixed kernel rules choose", flush=True)
        layer.kernels = tables[key]


def router_stopped_at_cap(router_file: Path, router: str) -> str | None:
    """`<router> router <n>/<layers> layers` when the router step's file says n layers stopped at their
    epoch cap while still improving (moefy.training.convergence); None when none did."""
    meta = tensors_metadata(router_file)
    capped = int(meta.get(convergence.KEY, "0"))
    return f"{router} router {capped}/{meta.get('layers', '?')} layers" if capped else None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = dist.setup(args.device)
    task = get_task(args.task)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, task.name).to(ctx.device)
    labels, routers = read_moe_parts(args.labels, args.router_file, args.router, args.num_experts, args.shared_experts)
    curves = read_error_curves(args.router_file) if "sensitivity" in args.allocations else None
    texts, targets = read_subset(args.data / "test.jsonl")
    encoded = Encoded(tokenizer, texts)
    whole = model_flops(model, float(encoded.lengths.mean()), causal=task.name == "causal_lm")  # before any FFN is replaced
    gates = read_gates(args.router_file)
    if gates and not args.reference:
        raise MoefyError(
            f"{args.router_file} has softmax gates, which weigh every expert even at budget 1: "
            "give the dense model to compare with as --reference"
        )
    layers = moefy_model(model, labels, routers, args.num_experts, shared_experts=args.shared_experts, gates=gates)
    dtype = PRECISIONS[args.precision]
    if args.reference or dtype == torch.float32:  # else the fp32 dense pass comes first (dense_passes)
        model.to(dtype)
        choose_kernels(args, layers)

    if task.labelled and targets is None:
        raise MoefyError(f"{args.data / 'test.jsonl'} has no labels, but task {task.name} needs them; rerun the data step")
    targets_t = None if targets is None else torch.as_tensor(targets, dtype=torch.long)
    batches = eval_batches(encoded, args.batch_size, ctx)
    identity = {
        **ablation(args),
        "precision": read_training(args.model).get("precision", "unknown"),
        convergence.KEY: convergence.stages(read_training(args.model), router_stopped_at_cap(args.router_file, args.router)),
        "looped_kernel": native.implementation(ctx.device),  # built here, not in the first timed batch
        "inference_precision": args.precision,
    }

    def measure(rule: SelectionRule, dense_predictions=None, on=(model, layers)):
        rule.apply(on[1])
        return run_pass(on[0], on[1], encoded, batches, task, targets_t, ctx, rule.label, dense_predictions)

    second = None
    if args.second_test:
        if task.name != "causal_lm":
            raise MoefyError(f"--second-test measures perplexity: it needs task causal_lm, not {task.name}")
        second_encoded = Encoded(tokenizer, read_subset(args.second_test)[0])
        second = (second_encoded, eval_batches(second_encoded, args.batch_size, ctx))

    def second_metric(rule: SelectionRule, on=(model, layers)) -> float:
        """The rule's perplexity on the second corpus (its times are not recorded, so the dense FFN
        is not timed beside it)."""
        rule.apply(on[1])
        totals = run_pass(on[0], on[1], *second, task, None, ctx, f"{rule.label}, second corpus", paired=False)[1]
        return task.metric_of(totals.score, totals.count)

    records = []
    routed = args.num_experts - args.shared_experts
    everything = SelectionRule("top_k", budget=1.0, k=routed)

    def dense_passes(on) -> tuple[list[torch.Tensor], object, dict]:
        """The dense model's pass in evaluate's precision; in bf16, after a pass in fp32 (`on` still
        in it), whose metric and predictions the record keeps beside bf16's."""
        if dtype == torch.float32:
            return *measure(everything, on=on)[:2], {}
        fp32_predictions, fp32, _ = measure(everything, on=on)
        on[0].to(dtype)
        choose_kernels(args, on[1])
        predictions, totals, _ = measure(everything, fp32_predictions, on=on)
        metric = task.metric
        beside = {
            f"fp32_dense_test_{metric}": task.metric_of(fp32.score, fp32.count),
            "fp32_dense_agreement": totals.agreeing / totals.count,
        }
        print(
            f"dense in bf16: {metric} {task.metric_of(totals.score, totals.count):.4f} against "
            f"{beside[f'fp32_dense_test_{metric}']:.4f} in fp32, {beside['fp32_dense_agreement']:.2%} same predictions",
            flush=True,
        )
        return predictions, totals, beside

    with tracking.job_run("evaluate", vars(args), ablation(args), enabled=ctx.is_main) as run:
        if args.reference:  # the relative numbers are against another model, measured with the same layers
            reference = load_model(args.reference, task.name).to(ctx.device)
            on = (reference, moefy_model(reference, labels, routers, args.num_experts, shared_experts=args.shared_experts))
            if dtype == torch.float32:
                choose_kernels(args, on[1])
            dense_predictions, dense, beside = dense_passes(on)
            dense_second = second_metric(everything, on) if second else None
            del reference, on
        else:
            dense_predictions, dense, beside = dense_passes((model, layers))
            dense_second = second_metric(everything) if second else None
        identity |= beside
        for rule in selection_rules(args.budgets, args.thresholds, layers, args.num_experts, args.allocations, curves):
            reuse = rule.runs_dense(routed) and not args.reference
            totals, kernels = (dense, "dense") if reuse else measure(rule, dense_predictions)[1:]
            entry = identity | record(rule, totals, dense, task, layers, kernels, whole)
            if second:
                value = dense_second if reuse else second_metric(rule)
                entry |= {"second_test_perplexity": value, "second_relative_perplexity": value / dense_second}
            records.append(entry)
            if ctx.is_main:
                metric = task.metric
                print(
                    f"{rule.label}: {entry['experts_per_token']:.2f} ± {entry['experts_per_token_std']:.2f} experts/token, "
                    f"{metric} {entry[f'test_{metric}']:.4f} ({entry[f'relative_{metric}']:.2%} of dense, "
                    f"{entry['dense_agreement']:.2%} same predictions), FFN FLOPs {entry['ffn_flops_fraction']:.3f}, "
                    f"FFN time {entry['ffn_ms_moe']:.0f} ms vs {entry['ffn_ms_dense']:.0f} ms dense "
                    f"({entry['ffn_speedup']:.2f}x); whole model FLOPs {entry['model_flops_fraction']:.3f}, "
                    f"time {entry['model_speedup']:.2f}x of dense",
                    flush=True,
                )
                run.log_metrics(logged_metrics(rule, entry, metric))
            pause.point(f"evaluate {rule.label}")
        if ctx.is_main:
            write_json(args.out, records)
            run.log_artifact(args.out)
    dist.teardown()


if __name__ == "__main__":
    run_step(main)
