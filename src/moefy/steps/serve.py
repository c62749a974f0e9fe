"""Step serve: a trained MoE decoder as a transformers MoE class's folder that runtimes load unchanged.

Two sources:
- a converted decoder recovered with softmax gates (recover/<variant>/<conversion>-linear-kd-softmax:
  --model its model/, --labels the balance step's labels, --router-file its router.safetensors,
  --budget the routed share): the MoE at that budget, every layer the same k;
- an upcycled or merged decoder (--sparse-model, a folder with sparse_moe.safetensors).
Writes <out>/model (config.json, model.safetensors, tokenizer, generation config: loads with
AutoModelForCausalLM.from_pretrained, remote code off) and <out>/served.json (the class, experts,
k, the logits' largest difference from moefy's model on probe tokens, bytes). A model with no exact
form (moefy.adapters.served) is refused with its reason and nothing written.
"""

from __future__ import annotations

from pathlib import Path

from moefy.adapters.ffn import find_ffns
from moefy.adapters.models import load_model, load_tokenizer
from moefy.adapters.served import write_served
from moefy.conversion.routers import budget_to_k
from moefy.errors import MoefyError
from moefy.files import write_json
from moefy.moe.checkpoints import SPARSE_FILE, load_sparse_moe, read_gates, read_moe_parts
from moefy.moe.sparse import from_split
from moefy.workflow import tracking
from moefy.workflow.cli import ablation, run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser(
        "serve",
        __doc__,
        "model",
        "task",
        "penalty",
        "seed",
        "split",
        "num_experts",
        "shared_experts",
        "router",
        "recovery",
        optional=("model", "split", "num_experts", "router"),
        out="output folder (gets model/ and served.json)",
    )
    parser.add_argument("--labels", type=Path, help="converted: balance/<variant>/<split>-E<E>/labels.safetensors")
    parser.add_argument(
        "--router-file", type=Path, help="converted: recover/<variant>/<conversion>-<recovery>/router.safetensors"
    )
    parser.add_argument("--budget", type=float, help="converted: share of experts per token, shared ones included, in (0, 1]")
    parser.add_argument("--sparse-model", type=Path, help="upcycled or merged: a folder with sparse_moe.safetensors")
    args = parser.parse_args(argv)
    if args.task != "causal_lm":
        parser.error(f"--task {args.task}: the served MoE classes are decoders (causal_lm)")
    if args.sparse_model is None:
        needed = ("model", "labels", "router_file", "budget", "split", "num_experts", "router")
        missing = [f"--{name.replace('_', '-')}" for name in needed if getattr(args, name) is None]
        if missing:
            parser.error(f"a converted decoder needs {', '.join(missing)} (or give --sparse-model)")
        if not 0 < args.budget <= 1:
            parser.error(f"--budget {args.budget}: must be in (0, 1]")
    return args


def converted(args):
    """The recovered decoder with its softmax-gated MoE layers in place, at the budget's k."""
    labels, routers = read_moe_parts(args.labels, args.router_file, args.router, args.num_experts, args.shared_experts)
    gates = read_gates(args.router_file)
    k = budget_to_k(args.budget, args.num_experts, args.shared_experts)
    model = load_model(str(args.model), "causal_lm").eval()
    moes = {}
    for ffn in find_ffns(model):
        gate = gates.get(ffn.index)
        moe = from_split(ffn, labels[ffn.index], args.num_experts, routers[ffn.index], k, args.shared_experts, gate is not None)
        if gate is not None:
            moe.gate.load_state_dict(gate.state_dict())
        ffn.replace(moe)
        moes[ffn.index] = moe
    return model, moes, load_tokenizer(str(args.model)), args.model


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.sparse_model is not None:
        if not (args.sparse_model / SPARSE_FILE).is_file():
            raise MoefyError(f"{args.sparse_model} has no {SPARSE_FILE}: give an upcycled or merged model's folder")
        model, moes, tokenizer = load_sparse_moe(args.sparse_model)
        source = args.sparse_model
    else:
        model, moes, tokenizer, source = converted(args)
    identity = ablation(args) | ({"budget": args.budget} if args.budget is not None else {})
    with tracking.job_run("serve", vars(args), identity) as run:
        record = write_served(model, moes, tokenizer, source, args.out / "model")
        write_json(args.out / "served.json", identity | record)
        run.log_metrics({"served_logit_difference": record["logit_difference"], "served_bytes": record["bytes"]})
        print(
            f"wrote {record['architecture']} ({record['routed_experts']} routed experts, {record['experts_per_token']} per token; "
            f"logits within {record['logit_difference']:.2g} of moefy's) to {args.out / 'model'}",
            flush=True,
        )


if __name__ == "__main__":
    run_step(main)
