"""Step evaluate_smoe: the task metric and the costs of a sparse MoE (full, merged or compressed).

Writes one JSON record: the test metric; total parameters, expert parameters and bytes of the
weight files on disk; FFN FLOPs per token as measured on the test set (a merged layer computes a
token's two experts of one group once; a compressed weight counts as its factored kernel) against
the dense model's FFNs, and the whole model's FLOPs against the dense model's (moefy.measure.flops);
experts per MoE layer; distillation steps since merging. A causal LM is also continued greedily
from held-out prompts (moefy.measure.generation): its tokens go into the record, and with
`--full` (the full SMoE's record) their agreement with the full SMoE's.
"""

from __future__ import annotations

from pathlib import Path

from moefy import dist
from moefy.adapters.ffn import dense_ffn_flops
from moefy.adapters.models import load_model, read_training
from moefy.adapters.tasks import get_task
from moefy.data.batches import Encoded, measure
from moefy.errors import MoefyError
from moefy.files import read_json, write_json
from moefy.measure import machine
from moefy.measure.flops import model_flops
from moefy.measure.generation import agreement, greedy_tokens, prompts_of
from moefy.moe.checkpoints import bytes_on_disk, load_smoe
from moefy.training.merging import chain_of
from moefy.training.recipe import read_texts
from moefy.workflow import tracking
from moefy.workflow.cli import ablation, run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser("evaluate_smoe", __doc__, "model", "task", "penalty", "seed", "device", out="output JSON file")
    parser.add_argument("--data", required=True, type=Path, help="the data step's folder")
    parser.add_argument("--upcycled", default="", help="the model's name in upcycling.models")
    parser.add_argument("--name", default="full", help="full, or the merged model's name (e.g. msmoe-G4-kd-svd-kd)")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--full", type=Path, help="causal LM: the full SMoE's record, whose greedy tokens agreement is against")
    parser.add_argument("--prompts", type=int, default=64, help="causal LM: held-out texts (the first ones) to prompt with")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="causal LM: a prompt's token ids, from its text's start")
    parser.add_argument("--new-tokens", type=int, default=32, help="causal LM: greedy tokens generated per prompt")
    return parser.parse_args(argv)


def generation(model, encoded: Encoded, args) -> dict:
    """The greedy continuations of the held-out prompts, and their agreement with the full SMoE's
    (`--full`'s record; the full SMoE itself agrees with itself)."""
    prompts = prompts_of(encoded.fields["input_ids"], args.prompts, args.prompt_tokens)
    tokens = greedy_tokens(model, prompts, args.new_tokens, args.eval_batch_size)
    if args.full is None and args.name != "full":
        return {"greedy_tokens": tokens}
    reference = tokens if args.full is None else read_json(args.full).get("greedy_tokens")
    if reference is None:
        raise MoefyError(f"{args.full} has no greedy_tokens: rerun the full SMoE's evaluate_smoe job (task causal_lm)")
    return agreement(tokens, reference).record() | {"greedy_tokens": tokens}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = dist.setup(args.device)
    task = get_task(args.task)
    model, moes, tokenizer, site = load_smoe(args.model, task.name, ctx.device)
    test = read_texts(args.data, "test", task)
    encoded = Encoded(tokenizer, test.texts)
    dense, whole = {}, None
    if site == "ffn":  # the folder's dense layout: its FFNs, and the whole model at the test set's mean length
        dense_model = load_model(str(args.model), task.name)
        dense = dense_ffn_flops(dense_model)
        whole = model_flops(dense_model, float(encoded.lengths.mean()), causal=task.name == "causal_lm")
        del dense_model
    identity = ablation(args) | {"upcycled": args.upcycled, **chain_of(args.name)}
    with tracking.job_run("evaluate_smoe", vars(args), identity, enabled=ctx.is_main) as run:
        for moe in moes.values():
            moe.reset_statistics()
        value = measure(model, task, encoded, test.labels, args.eval_batch_size, ctx, "test")
        moe_flops = {i: moe.flops_per_token() for i, moe in moes.items()}
        ffn = sum(moe_flops.values()) + sum(f for i, f in dense.items() if i not in moes)
        total = sum(p.numel() for p in model.parameters())
        record = {
            **identity,
            f"test_{task.metric}": value,
            "total_parameters": total,
            "expert_parameters": sum(moe.expert_parameter_count() for moe in moes.values()),
            "bytes_on_disk": bytes_on_disk(args.model),
            "ffn_flops_per_token": ffn,
            "dense_ffn_flops_per_token": float(sum(dense.values())) or None,
            "ffn_flops_fraction": ffn / sum(dense.values()) if dense else None,
            "model_flops_fraction": whole.fraction_with(ffn / sum(dense.values())) if whole else None,
            "experts_per_layer": {str(i): moe.num_experts for i, moe in moes.items()},
            "computed_experts_per_token": sum(m.computed for m in moes.values())
            / max(1, sum(m.tokens_seen for m in moes.values())),
            "recovery_steps": read_training(args.model).get("recovery_steps", 0),
            "site": site,
            "machine": machine.describe(ctx.device),
        }
        if ctx.is_main and task.name == "causal_lm":  # after the counts above: generation routes tokens too
            record |= generation(model, encoded, args)
        if ctx.is_main:
            write_json(args.out, record)
            run.log_metrics({k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            print(
                f"{args.name}: test {task.metric} {value:.4f}; {total:,} parameters, {record['bytes_on_disk']:,} bytes; "
                f"FFN FLOPs {ffn:,.0f} per token"
                + (f"; greedy agreement {record['generation_agreement']:.4f}" if "generation_agreement" in record else ""),
                flush=True,
            )
    dist.teardown()


if __name__ == "__main__":
    run_step(main)
