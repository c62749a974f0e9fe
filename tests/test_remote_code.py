"""The remote-code export: a converted encoder that transformers loads with its custom-code convention,
in a process that cannot import moefy, gives moefy's logits; what it cannot compute is refused."""

import json
import subprocess
import sys
import sysconfig

import pytest
import torch

from moefy.adapters.ffn import find_ffns
from moefy.adapters.models import load_classifier, load_tokenizer, save_classifier
from moefy.conversion.routers import (
    LinearRouter,
    MLPRouter,
    NormRouter,
    SimilarityRouter,
    expert_centroids,
    representative_router,
)
from moefy.errors import MoefyError
from moefy.files import load_tensors, save_tensors, tensors_metadata
from moefy.moe.checkpoints import MOE_FILE, load_moe, save_moe
from moefy.serving.remote_code import MODELING_FILE, write_remote_code

E = 8
TEXTS = ["the movie was good", "a dull boring plot with its cast", "bad", "funny smart and moving but the plot was weak"]
# (router, shared experts, budget): every kind the export writes, most with shared experts
CASES = [("similarity", 2, 0.5), ("mlp", 0, 0.25), ("norm", 2, 0.75), ("linear", 1, 0.5), ("representative", 2, 0.5)]

# Run with `python -S`: no site-packages processing, so no .pth file (moefy's editable install is one)
# puts moefy on sys.path; torch and transformers come from the site-packages folder given.
CHILD = """
import json, sys
sys.path.append(sys.argv[1])
try:
    import moefy
except ImportError:
    pass
else:
    raise SystemExit(f"moefy is importable from {moefy.__file__}")
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
def run(folder):
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        out = model(**tokenizer(json.loads(sys.argv[2]), padding=True, return_tensors="pt"), output_hidden_states=True)
    return model, [out.logits.tolist(), out.hidden_states[-1].tolist()]
got = {}
for folder in sys.argv[3:]:
    model, got[folder] = run(folder)
    if folder == sys.argv[3]:  # saved by transformers, it loads again (the modeling file copied, auto_map kept)
        model.save_pretrained("resaved")
        AutoTokenizer.from_pretrained(folder, trust_remote_code=True).save_pretrained("resaved")
        got["resaved"] = run("resaved")[1]
print(json.dumps(got))
"""


@pytest.fixture(scope="module")
def finetuned(tiny_bert, tmp_path_factory):
    torch.manual_seed(0)
    model = load_classifier(str(tiny_bert), label_names=["rotten", "fresh"])
    with torch.no_grad():  # logits of order 1 (a random head gives hundredths), so that 1e-5 means something
        model.classifier.weight.mul_(100)
    folder = tmp_path_factory.mktemp("finetuned") / "model"
    save_classifier(model, load_tokenizer(str(tiny_bert)), folder)
    return folder


def routers_of(model, router: str, shared: int):
    """Random balanced labels and a router of the kind for each layer, scoring the E - shared routed experts."""
    labels, routers = {}, {}
    routed = E - shared
    for ffn in find_ffns(model):
        layer_labels = torch.randperm(ffn.d_ff, generator=torch.Generator().manual_seed(ffn.index)) % E
        labels[ffn.index] = layer_labels
        torch.manual_seed(10 + ffn.index)
        if router == "similarity":
            routers[ffn.index] = SimilarityRouter(expert_centroids(ffn.w_in.weight.detach(), layer_labels, E)[:routed])
        elif router == "mlp":
            routers[ffn.index] = MLPRouter(ffn.d_model, routed)
        elif router == "norm":
            routers[ffn.index] = NormRouter(ffn.d_model, routed, hidden=16)
        elif router == "linear":
            routers[ffn.index] = LinearRouter(ffn.d_model, routed)
        else:
            with torch.no_grad():
                h = ffn.activations(torch.randn(64, ffn.d_model))
            routers[ffn.index] = representative_router(ffn, layer_labels, E, h, per_expert=2, routed=routed)
    return labels, routers


@pytest.fixture(scope="module")
def exported(finetuned, tmp_path_factory):
    """Each case exported by moefy (save_moe), keyed by case."""
    model = load_classifier(str(finetuned)).eval()
    root = tmp_path_factory.mktemp("exported")
    folders = {}
    for router, shared, budget in CASES:
        labels, routers = routers_of(model, router, shared)
        folders[router] = save_moe(finetuned, labels, routers, router, E, budget, root / router, shared_experts=shared)
    return folders


def test_the_remote_code_folder_gives_moefys_logits_without_moefy(exported, finetuned, tmp_path):
    remote = {router: write_remote_code(folder, tmp_path / f"{router}-remote") for router, folder in exported.items()}
    assert all((folder / MODELING_FILE).is_file() and not (folder / MOE_FILE).exists() for folder in remote.values())
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    site_packages = sysconfig.get_paths()["purelib"]
    args = [sys.executable, "-S", "-c", CHILD, site_packages, json.dumps(TEXTS), *map(str, remote.values())]
    child = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    got = json.loads(child.stdout.splitlines()[-1])

    dense = load_classifier(str(finetuned)).eval()
    tokenizer = load_tokenizer(str(finetuned))
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        dense_states = dense(**batch, output_hidden_states=True).hidden_states[-1]
    assert got["resaved"] == got[str(remote[CASES[0][0]])]  # the child saved the first folder again
    for router, folder in exported.items():
        model, _ = load_moe(folder)
        with torch.no_grad():
            expected = model(**batch, output_hidden_states=True)
        logits, states = map(torch.tensor, got[str(remote[router])])
        assert expected.logits.abs().max() > 0.1
        assert (logits - expected.logits).abs().max() <= 1e-5, router
        assert (states - expected.hidden_states[-1]).abs().max() <= 1e-5, router
        assert (expected.hidden_states[-1] - dense_states).abs().max() > 1e-2, f"{router}: the MoE computes the dense model"


@pytest.mark.parametrize("key,value,says", [("rule", "threshold", "top-k only"), ("router", "groundtruth", "groundtruth")])
def test_what_the_template_cannot_compute_is_refused_writing_nothing(exported, tmp_path, key, value, says):
    folder = tmp_path / "changed"
    folder.mkdir()
    for path in exported["mlp"].iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    meta = tensors_metadata(folder / MOE_FILE) | {key: value}
    save_tensors(folder / MOE_FILE, load_tensors(folder / MOE_FILE), meta)
    with pytest.raises(MoefyError, match=says):
        write_remote_code(folder, tmp_path / "remote")
    assert not (tmp_path / "remote").exists()
