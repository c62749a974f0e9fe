"""Standard evaluation with lm-eval-harness: any causal LM of a study (dense, converted, exported),
on an offline task made from the study's own held-out texts and on any named lm-eval task.

The offline task is lm-eval's loglikelihood_rolling over the texts (word and byte perplexity, bits
per byte), written as a task YAML and a jsonl file into a temporary folder, so it needs no hub.
lm-eval encodes each text without special tokens and predicts every token, the first from a prefix
token (the tokenizer's BOS, else EOS), in windows of `max_length`. Step evaluate (task causal_lm)
encodes the text with the tokenizer's special tokens, truncated to its model_max_length, and
predicts every token after the first. Both therefore predict the same tokens from the same context
when the tokenizer prepends exactly its BOS and appends nothing, and the text fits both lengths
(`differences_from_evaluate` says which texts do not): then `perplexity` below, exp(-loglikelihood /
tokens), is evaluate's test perplexity of the same model. lm-eval's own default (add_bos_token
unset) would also encode the BOS and predict it from the prefix BOS: a meaningless extra token per
text, so it is turned off for this task; named tasks run with lm-eval's own settings.

lm-eval calls the model with no attention mask and pads on the right. A causal model's real
positions never see the padding, unless its experts choose their tokens among the whole batch
(expert choice): such a model runs one text per forward, and is never the same as evaluate.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from moefy.adapters.families import is_dense_family
from moefy.adapters.models import load_config, load_model, load_tokenizer
from moefy.data.batches import Encoded
from moefy.errors import MoefyError
from moefy.files import tensors_metadata
from moefy.moe.checkpoints import MOE_FILE, SPARSE_FILE, load_moe, load_sparse_moe

OFFLINE_TASK = "moefy_heldout"
OFFLINE_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # transformers' names of next-token heads


def _moefy_moe(path: Path) -> tuple[torch.nn.Module, object, str] | None:
    """A model moefy exported (moe.safetensors) or trained as a sparse MoE (sparse_moe.safetensors),
    through moefy's own loaders; None for any other folder."""
    for file, kind in ((MOE_FILE, "moefy MoE"), (SPARSE_FILE, "moefy sparse MoE")):
        if (path / file).is_file():
            task = tensors_metadata(path / file).get("task", "classification")
            if task != "causal_lm":
                raise MoefyError(f"{path} is a moefy MoE of task {task}, not a causal LM: lm-eval needs task causal_lm")
            if file == MOE_FILE:
                model, tokenizer = load_moe(path)
            else:
                model, _, tokenizer = load_sparse_moe(path)
            return model.float().eval(), tokenizer, kind
    return None


def load_causal_lm(folder: str) -> tuple[torch.nn.Module, object, str]:
    """(float32 model in eval mode, tokenizer, what it is) of a model folder: one moefy exported or
    trained (its MoE layers in place), or a plain transformers causal LM (dense, or a Hugging Face
    MoE class)."""
    path = Path(folder)
    if not path.is_dir():
        raise MoefyError(f"model folder {folder} does not exist; give a folder with config.json, weights and tokenizer")
    moe = _moefy_moe(path)
    if moe is not None:
        return moe
    config = load_config(folder)
    architectures = getattr(config, "architectures", None) or []
    if not any(name.endswith(_CAUSAL_SUFFIXES) for name in architectures):
        raise MoefyError(
            f"{folder} holds a {', '.join(architectures) or config.model_type} model, not a causal LM with a next-token "
            "head (a *ForCausalLM class): lm-eval scores next-token predictions; save the model with its LM head"
        )
    if is_dense_family(config):  # moefy's loader: a distilled model's attention projections too
        return load_model(folder, "causal_lm").eval(), load_tokenizer(folder), "transformers"
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise MoefyError(f"cannot load the causal LM in {folder}: {str(err).splitlines()[0]}") from None
    return model.eval(), load_tokenizer(folder), "transformers"


def compares_tokens(model: torch.nn.Module) -> bool:
    """Whether a token's experts depend on the other tokens of its batch (expert-choice routing)."""
    return any(getattr(getattr(m, "routing", None), "kind", None) == "expert_choice" for m in model.modules())


def write_offline_task(texts: Sequence[str], folder: Path) -> None:
    """The held-out texts as lm-eval task OFFLINE_TASK in `folder` (docs.jsonl and its YAML); the
    datasets cache goes into the folder too, so nothing is left in the user's cache."""
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    task = {
        "task": OFFLINE_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "docs.jsonl")}, "cache_dir": str(folder / "cache")},
        "output_type": "loglikelihood_rolling",
        "test_split": "test",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": name, "aggregation": "bits_per_byte" if name == "bits_per_byte" else "weighted_perplexity"}
            | {"higher_is_better": False}
            for name in OFFLINE_METRICS
        ],
    }
    (folder / f"{OFFLINE_TASK}.yaml").write_text(json.dumps(task, indent=1))  # JSON is YAML


def load_tasks(manager, names: Sequence[str]) -> list:
    """lm-eval's Task and Group objects of `names`, datasets loaded; every name that cannot be loaded
    in one MoefyError (unknown, or its dataset only on the hub, which this machine cannot reach)."""
    loaded, problems = [], []
    for name in names:
        try:
            built = manager.load(name)
        except KeyError:
            problems.append(f"{name} is not an lm-eval task (`lm-eval ls tasks` lists them)")
            continue
        except ConnectionError as err:  # datasets' offline mode and unreachable hosts alike
            problems.append(
                f"lm-eval task {name} needs its dataset from the Hugging Face hub, which this machine cannot reach "
                f"({str(err).splitlines()[0]}): run it once with hub access to fill the datasets cache, or leave it out"
            )
            continue
        except OSError as err:
            problems.append(f"the dataset of lm-eval task {name} cannot be loaded ({str(err).splitlines()[0]})")
            continue
        whole = built["groups"].get(name) or built["tasks"].get(name)
        loaded += [whole] if whole is not None else list(built["tasks"].values())  # a tag: its tasks
    if problems:
        raise MoefyError("; ".join(problems))
    return loaded


def differences_from_evaluate(tokenizer, texts: Sequence[str], prefix: int, max_length: int) -> list[str]:
    """Why lm-eval's offline task predicts other tokens than step evaluate for some texts, as
    "<n> texts: <why>" lines ([]: the same tokens from the same context for every text)."""
    counts: dict[str, int] = {}
    limit = min(tokenizer.model_max_length, 2**31 - 1)  # unset is 1e30, which a fast tokenizer cannot take
    for text, ids in zip(texts, Encoded(tokenizer, texts, limit).fields["input_ids"], strict=True):
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        if list(ids) == [prefix, *plain] and len(plain) <= max_length:
            continue
        if len(plain) > max_length:
            why = f"longer than lm-eval's max_length {max_length}: it predicts them in windows"
        elif len(plain) + 1 > limit:
            why = f"longer than the tokenizer's model_max_length {limit}, where evaluate truncates them"
        elif list(ids) == plain:
            why = f"the tokenizer adds no BOS: lm-eval predicts their first token (from token {prefix}), evaluate does not"
        else:
            why = "the tokenizer adds special tokens besides one leading BOS (evaluate predicts those after the first)"
        counts[why] = counts.get(why, 0) + 1
    return [f"{n} texts: {why}" for why, n in counts.items()]


def _metrics(entry: dict) -> dict[str, float]:
    """lm-eval's `metric,filter` entries of one task as {metric (/filter unless none): value}, numbers only."""
    out = {}
    for key, value in entry.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "," in key:
            metric, kept = key.split(",", 1)
            out[metric if kept == "none" else f"{metric}/{kept}"] = float(value)
    return out


def nonblank(texts: Sequence[str]) -> list[str]:
    """The texts with something to predict in them; none at all is an error."""
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise MoefyError("no held-out texts to evaluate on: give a file with at least one non-blank text")
    return texts


def _quiet() -> None:
    """lm-eval's INFO lines (one per setting it fills in) would drown the step's own output."""
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.WARNING)


def offline(model: torch.nn.Module, tokenizer, texts: Sequence[str], max_length: int | None, batch_size: int) -> dict:
    """lm-eval's loglikelihood_rolling on the texts: its metrics, the total log-likelihood, the
    predicted tokens and their perplexity, and why it differs from step evaluate where it does."""
    texts = nonblank(texts)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise MoefyError("the tokenizer has neither a BOS nor an EOS token, which lm-eval predicts each text's first token from")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    _quiet()
    batch_dependent = compares_tokens(model)
    if batch_dependent and batch_size != 1:
        print("the model routes by expert choice, where padding would take capacity: one text per forward", flush=True)
        batch_size = 1
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        backend="causal",
        batch_size=batch_size,
        max_length=max_length,
        add_bos_token=False,
        prefix_token_id=prefix,
    )
    with tempfile.TemporaryDirectory(prefix="moefy-lm-eval-") as folder:
        write_offline_task(texts, Path(folder))
        manager = TaskManager(include_path=folder, include_defaults=False)
        results = lm_eval.simple_evaluate(model=lm, tasks=load_tasks(manager, [OFFLINE_TASK]), task_manager=manager)
    loglikelihood = sum(float(sample["filtered_resps"][0]) for sample in results["samples"][OFFLINE_TASK])
    tokens = sum(len(lm.tok_encode(text)) for text in texts)
    differences = differences_from_evaluate(tokenizer, texts, prefix, lm.max_length)
    if batch_dependent:
        differences.append(f"{len(texts)} texts: expert choice routes each batch as a whole, and evaluate's batches are others")
    return {
        "documents": len(texts),
        "tokens": tokens,
        "loglikelihood": loglikelihood,
        "perplexity": math.exp(-loglikelihood / tokens),
        **{name: value for name, value in _metrics(results["results"][OFFLINE_TASK]).items() if name in OFFLINE_METRICS},
        "same_as_evaluate": not differences,
        "differences_from_evaluate": differences,
        "max_length": lm.max_length,
        "batch_size": batch_size,
        "prefix_token_id": prefix,
    }


def named_tasks(manager, tasks: list, model: torch.nn.Module, tokenizer, max_length: int | None, batch_size: int) -> dict:
    """lm-eval's metrics of loaded tasks ({task or group: {metric: value}}), with lm-eval's own
    settings (the tokenizer's special tokens as it adds them), so they compare with published runs."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    _quiet()
    batch_size = 1 if compares_tokens(model) else batch_size
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, max_length=max_length)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager)
    return {name: _metrics(entry) for part in ("results", "groups") for name, entry in results.get(part, {}).items()}


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    tasks: Sequence[str] = (),
    max_length: int | None = None,
    batch_size: int = 16,
) -> dict:
    """lm-eval on the offline task of `texts` (`offline`) and on the named `tasks`, whose datasets
    are loaded first, so that one that cannot be is an error before anything runs:
    {"offline": ..., "tasks": {name: {metric: value}}, "lm_eval": its version}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    texts = nonblank(texts)  # before the tasks' datasets load
    if not tasks:
        return {"offline": offline(model, tokenizer, texts, max_length, batch_size), "tasks": {}, "lm_eval": lm_eval.__version__}
    _quiet()
    manager = TaskManager()
    loaded = load_tasks(manager, tasks)
    result = offline(model, tokenizer, texts, max_length, batch_size)
    named = named_tasks(manager, loaded, model, tokenizer, max_length, batch_size)
    return {"offline": result, "tasks": named, "lm_eval": lm_eval.__version__}
