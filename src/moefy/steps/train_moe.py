"""Step train_moe: train a model whose FFNs are MoE layers.

Modes:
- recover: a conversion (the balance step's labels, the router step's router) trained at
  recover.budget with MoEfication's unweighted top-k and its router frozen (moefy.moe.sparse);
  recovery `task` trains on the task loss, `kd` adds distillation from the dense model's logits;
  `task-softmax` and `kd-softmax` also train the linear router, whose softmax gates weigh its picks
  from gate 1 (moefy.conversion.routers.SoftmaxGate), at recover.router_learning_rate.
  recover.trainable picks what trains: the experts, the experts and LoRA adapters on the attention
  projections (moefy.training.lora; merged into them after training), or every weight.
  The trained experts go back into the FFNs, so <out>/model is a standard checkpoint that the
  evaluate step measures at every budget with the same labels and <out>/router.safetensors (the
  router step's file, or the trained router and its gates).
- moe: an upcycled model (the upcycle step's folder, moefy.export.load_sparse_moe) trained on,
  every weight but the embeddings, with the routers' auxiliary losses; <out>/model is the same
  format.
- dense: the fine-tuned model trained on with the same data, schedule and steps: upcycling's
  baseline.
- merged: a merged or compressed sparse MoE (steps merge, compress) trained on with distillation
  from the full SMoE (`--teacher`), MC-SMoE's recovery; <out>/model keeps its format.

The epoch with the best validation metric is kept; recover and merged stop after train_moe.patience
epochs without a better one (moe and dense train their whole schedule, the same steps), and a run
whose last epoch was its best stopped at its cap while still improving (moefy.training.convergence):
metrics.json's stopped_at_cap, a warning in the log and the model's training.json say so. Runs as a plain process or data parallel under
torch.distributed.run, like finetune. Writes <out>/model and <out>/metrics.json (test metric,
parameters, active parameters and FFN FLOPs per token, training steps, tokens, FLOPs and time,
expert load).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from moefy import dist
from moefy.adapters.ffn import dense_ffn_flops, find_ffns
from moefy.adapters.models import TRAINING_FILE, load_model, load_tokenizer, read_training, save_model
from moefy.adapters.tasks import get_task
from moefy.conversion.routers import budget_to_k, router_tensors
from moefy.data.batches import Encoded, measure
from moefy.files import atomic_dir, atomic_path, load_tensors, save_tensors, tensors_metadata, write_json
from moefy.measure import machine
from moefy.moe.checkpoints import load_smoe, read_moe_parts, save_sparse_moe
from moefy.moe.sparse import SparseMoE, from_split, mask_padding
from moefy.training import convergence
from moefy.training.loop import Batch, Epoch, train_epochs
from moefy.training.lora import add_lora
from moefy.training.moe_training import (
    LossWeights,
    auxiliary_loss,
    distillation_loss,
    heldout_distillation,
    load_statistics,
    select_trainable,
    write_back,
)
from moefy.training.recipe import optimiser, read_texts
from moefy.workflow import pause, tracking
from moefy.workflow.cli import ablation, add_section_flags, run_step, step_parser

MODES = ("recover", "moe", "dense", "merged")
STAGES = {"recover": "recovery", "moe": "upcycled training", "dense": "dense continuation", "merged": "merged recovery"}


def parse_args(argv: list[str] | None):
    parser = step_parser(
        "train_moe", __doc__, "model", "task", "penalty", "seed", "split", "num_experts", "shared_experts", "router",
        "recovery", "device", out="output folder (gets model/ and metrics.json)", optional=("split", "num_experts", "router"),
    )  # fmt: skip
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--data", required=True, type=Path, help="folder with train/validation/test.jsonl and labels.json")
    parser.add_argument("--labels", type=Path, help="recover: balance/<variant>/<split>-E<E>/labels.safetensors")
    parser.add_argument("--router-file", type=Path, help="recover: router/<variant>/<split>-E<E>-<router>/router.safetensors")
    parser.add_argument(
        "--upcycled", help="moe, dense, merged: the name in upcycling.models (dense: dense), for records and tags"
    )
    parser.add_argument("--teacher", type=Path, help="merged: the full SMoE the merged model distils from")
    parser.add_argument("--name", help="merged: the merged model's name, e.g. msmoe-G4-kd (its MLflow tag)")
    add_section_flags(parser, "train_moe")
    add_section_flags(parser, "recover")
    args = parser.parse_args(argv)
    if args.mode == "recover":
        missing = [
            f"--{name.replace('_', '-')}"
            for name in ("labels", "router_file", "split", "router", "num_experts")
            if getattr(args, name) is None
        ]
        if args.recovery == "none":
            missing.append("--recovery task, kd, task-softmax or kd-softmax")
        if missing:
            parser.error(f"--mode recover needs {', '.join(missing)}")
    if args.mode == "merged" and args.teacher is None:
        parser.error("--mode merged needs --teacher (the full SMoE folder)")
    return args


def build(args, model) -> tuple[dict[int, SparseMoE], dict]:
    """Put a conversion's MoE layers into `model` (mode recover); returns them by FFN index and
    what was built."""
    labels, routers = read_moe_parts(args.labels, args.router_file, args.router, args.num_experts, args.shared_experts)
    k = budget_to_k(args.budget, args.num_experts, args.shared_experts)
    softmax = args.recovery.endswith("-softmax")
    moes = {}
    for ffn in find_ffns(model):
        moes[ffn.index] = from_split(
            ffn, labels[ffn.index], args.num_experts, routers[ffn.index], k, args.shared_experts, softmax_gates=softmax
        )
        ffn.replace(moes[ffn.index])
    mask_padding(model, moes.values())
    return moes, {"budget": args.budget, "k": k, "labels": labels}


def model_to_train(args, task):
    """The model to train, its MoE layers by FFN index, what they are, and the dense FFN FLOPs
    per token they are measured against (an upcycled FFN: the FFN it copies)."""
    if args.mode in ("moe", "merged"):
        model, moes, _, site = load_smoe(args.model, task.name)
        if site == "ffn":  # the folder's dense layout (FFNs unread)
            dense_flops = dense_ffn_flops(load_model(args.model, task.name))
        else:  # a Hugging Face SMoE: measured against its MoE layers as the routing rule runs them
            dense_flops = {i: int(moe.flops_per_token(measured=False)) for i, moe in moes.items()}
        return model, moes, {"upcycling": read_training(args.model).get("upcycle", {}), "site": site}, dense_flops
    model = load_model(args.model, task.name)
    dense_flops = dense_ffn_flops(model)
    if args.mode == "dense":
        return model, {}, {}, dense_flops
    moes, built = build(args, model)
    return model, moes, built, dense_flops


def count_flops(model, moes: dict[int, SparseMoE], dense_ffn_flops: dict[int, int]) -> dict[str, float]:
    """FFN FLOPs per token of the MoE model (active experts and routers, as the routing rule sends
    them) over the dense model's."""
    dense = float(sum(dense_ffn_flops.values()))
    moe = sum(moes[i].flops_per_token(measured=False) if i in moes else flops for i, flops in dense_ffn_flops.items())
    return {"ffn_flops_per_token": moe, "dense_ffn_flops_per_token": dense, "ffn_flops_fraction": moe / dense if dense else 1.0}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = dist.setup(args.device)
    torch.manual_seed(args.seed)
    task = get_task(args.task)
    tokenizer = load_tokenizer(args.model)
    model, moes, built, dense_ffn_flops = model_to_train(args, task)
    # recover: the dense model is the teacher (kd) and where the trained experts go back;
    # merged: the full SMoE is the teacher
    dense = load_model(args.model, task.name) if args.mode == "recover" else None
    if args.mode == "merged":
        dense = load_smoe(args.teacher, task.name)[0]
    kd = args.mode == "merged" or (args.mode == "recover" and args.recovery in ("kd", "kd-softmax"))
    # MoEfication's routers are frozen and unweighted: no auxiliary loss can train them
    routed = args.mode == "moe"
    weights = LossWeights(
        args.distill_alpha if kd else 0.0,
        args.temperature,
        args.load_loss_weight if routed else 0.0,
        args.z_weight if routed else 0.0,
    )
    teacher = dense.to(ctx.device).eval().requires_grad_(False) if kd else None
    model.to(ctx.device)
    lora = None
    if args.mode == "recover" and args.trainable == "lora":
        lora = add_lora(model, moes.values(), args.lora_rank, args.lora_alpha, args.lora_dropout)
    trainable = select_trainable(model, moes.values(), args.trainable if args.mode == "recover" else "all")
    if args.mode != "recover" or args.trainable == "all":
        model.get_input_embeddings().weight.requires_grad_(False)  # kept, as finetune keeps them
        trainable = [p for p in trainable if p.requires_grad]

    train_set = read_texts(args.data, "train", task, args.max_train_examples, args.seed)
    val_set, test_set = read_texts(args.data, "validation", task), read_texts(args.data, "test", task)
    train, validation, test = (Encoded(tokenizer, t.texts) for t in (train_set, val_set, test_set))
    train_y = None if train_set.labels is None else torch.as_tensor(train_set.labels, dtype=torch.long)
    val_labels, test_labels = val_set.labels, test_set.labels

    optimizer, scheduler, total_steps = optimiser(
        parameter_groups(trainable, moes.values(), args), train.lengths, args, args.epochs, args.max_steps
    )
    gates = [moe.gate for moe in moes.values() if moe.gate is not None]
    if gates:  # softmax gates keep a scale above 0, where the served formats pick what they pick
        optimizer.register_step_post_hook(lambda *_: [gate.keep_scale_above_floor() for gate in gates])
    metric = task.metric
    identity = {**ablation(args), "mode": args.mode} | ({"upcycled": args.upcycled} if args.upcycled else {})
    if args.name:
        identity["merged"] = args.name
    causal = task.name == "causal_lm"

    def objective(batch: Batch):
        """(1 - alpha) * task + alpha * distillation from the teacher's logits, plus the routers' auxiliary losses."""
        total, terms = (1 - weights.distill) * batch.task_loss, {}
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(**batch.inputs).logits
            mask = batch.inputs["attention_mask"].bool() if causal else None
            kd = distillation_loss(batch.logits, teacher_logits, weights.temperature, mask)
            total = total + weights.distill * (kd * len(batch) * batch.scale)  # summed like the task loss
            terms["distill"] = kd.item()
        aux = auxiliary_loss(moes.values(), weights)
        if aux is not None:
            total = total + aux
            terms["aux"] = aux.item()
        return total, terms

    def validation_distillation() -> float:
        return heldout_distillation(model, teacher, validation, args.eval_batch_size, ctx, weights.temperature, causal)

    def before() -> dict[str, float]:
        first = {f"validation_{metric}": measure(model, task, validation, val_labels, args.eval_batch_size, ctx, "validation")}
        if teacher is not None:
            first["validation_distill_loss"] = validation_distillation()
        return first

    def after_epoch(epoch: Epoch) -> dict[str, float]:
        load = load_statistics(moes)  # the epoch's training batches, before validation adds to the counts
        value = measure(model, task, validation, val_labels, args.eval_batch_size, ctx, "validation")
        metrics = {
            f"validation_{metric}": value,
            "train_loss": epoch.means["task"],
            "distill_loss": epoch.means.get("distill", 0.0),
            "aux_loss": epoch.means.get("aux", 0.0),
            "epoch_seconds": epoch.seconds,
            "train_tokens": epoch.tokens,
            **{f"train_{k}": v for k, v in load.items()},
        }
        if teacher is not None:
            metrics["validation_distill_loss"] = validation_distillation()
        return metrics

    with tracking.job_run("train_moe", vars(args), identity, enabled=ctx.is_main) as run:
        trained = train_epochs(
            model, task, train, train_y, ctx, optimizer, scheduler, name="train_moe", epochs=args.epochs,
            total_steps=total_steps, batch_size=args.batch_size, seed=args.seed, objective=objective, measure=after_epoch,
            log=run.log_metrics, pause=pause.point, before=before,
            patience=args.patience if args.mode in ("recover", "merged") else None,
        )  # fmt: skip
        train_seconds = time.time() - trained.started
        if lora is not None:  # into the projections' weights now, so that the test pass measures what is saved
            model = lora.merge_and_unload()
        load_statistics(moes)
        test_value = measure(model, task, test, test_labels, args.eval_batch_size, ctx, "test")
        test_load = load_statistics(moes)
        flops = count_flops(model, moes, dense_ffn_flops)
        total_params = sum(p.numel() for p in model.parameters())
        expert_params = sum(
            p.numel() for moe in moes.values() for name, p in moe.named_parameters() if not name.startswith("router.")
        )
        active = total_params - expert_params + sum(moe.active_parameters() for moe in moes.values())
        metrics = {
            **identity,
            **{k: v for k, v in built.items() if k != "labels"},
            f"validation_{metric}": trained.best,
            f"test_{metric}": test_value,
            "best_epoch": trained.best_epoch,
            "epochs_run": trained.epochs_run,
            convergence.KEY: trained.stopped_at_cap,
            "train_steps": trained.steps,
            "train_tokens": trained.tokens,
            "train_seconds": train_seconds,
            # forward + backward = 3 forwards of 2 FLOPs per active weight and token (embeddings included)
            "train_flops": 6.0 * active * trained.tokens,
            "total_parameters": total_params,
            "active_parameters": active,
            **flops,
            **{f"test_{k}": v for k, v in test_load.items()},
            "history": trained.history,
            "machine": machine.describe(ctx.device),
        }
        if ctx.is_main:
            print(
                f"test {metric} {test_value:.4f}; FFN FLOPs {flops['ffn_flops_fraction']:.3f} of dense; {total_params:,} parameters, {active:,} active",
                flush=True,
            )
            training = read_training(args.model)
            training |= {
                "train_moe": identity | {k: v for k, v in built.items() if k != "labels"},
                "recovery_steps": training.get("recovery_steps", 0) + (trained.steps if args.mode == "merged" else 0),
            }
            if trained.stopped_at_cap:
                stage = STAGES[args.mode] + (f" {args.recovery}" if args.mode == "recover" else "")
                print(
                    convergence.warning(
                        stage, f"train_moe.epochs {args.epochs}" + (f" / max_steps {args.max_steps}" if args.max_steps else "")
                    ),
                    flush=True,
                )
                training = convergence.note(training, stage)
            if args.mode in ("moe", "merged"):
                save_sparse_moe(model, moes, tokenizer, args.out / "model", task.name, training, built["site"])
            else:
                if args.mode == "recover":
                    write_router_file(args, moes)
                    model = recovered(dense.cpu(), model.cpu(), moes, built["labels"])
                with atomic_dir(args.out / "model") as folder:
                    save_model(model, tokenizer, folder)
                    write_json(folder / TRAINING_FILE, training)
            write_json(args.out / "metrics.json", metrics)
            run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    dist.teardown()


def parameter_groups(trainable: list, moes, args) -> list[dict]:
    """AdamW's parameter groups: softmax-gated routers and their gates at recover.router_learning_rate,
    everything else at the step's learning rate."""
    routing = {id(p) for moe in moes if moe.gate is not None for p in (*moe.router.parameters(), *moe.gate.parameters())}
    groups = [{"params": [p for p in trainable if id(p) not in routing]}]
    if routing:
        groups.append({"params": [p for p in trainable if id(p) in routing], "lr": args.router_learning_rate})
    return [group for group in groups if group["params"]]


def write_router_file(args, moes: dict[int, SparseMoE]) -> None:
    """<out>/router.safetensors, what the recovered model routes with: the router step's file, or
    with softmax gates the trained routers and their gates in its place (its error curves kept)."""
    path = args.out / "router.safetensors"
    if not any(moe.gate is not None for moe in moes.values()):
        with atomic_path(path) as tmp:
            shutil.copyfile(args.router_file, tmp)
        return
    curves = {k: t for k, t in load_tensors(args.router_file).items() if k.startswith("error_curve.")}
    routers = {i: moe.router.router for i, moe in moes.items()}  # from_split's wrapper around the router
    gates = {i: moe.gate for i, moe in moes.items()}
    tensors = {k: t.detach().cpu().contiguous() for k, t in router_tensors(routers, gates).items()}
    save_tensors(path, tensors | curves, tensors_metadata(args.router_file))


def recovered(pristine, model, moes: dict[int, SparseMoE], labels: dict) -> torch.nn.Module:
    """The dense-layout model with the trained experts written back (and any other trained weight)."""
    names = pristine.state_dict().keys()
    pristine.load_state_dict({k: v for k, v in model.state_dict().items() if k in names}, strict=False)
    for ffn in find_ffns(pristine):
        write_back(ffn, moes[ffn.index], labels[ffn.index])
    return pristine


if __name__ == "__main__":
    run_step(main)
