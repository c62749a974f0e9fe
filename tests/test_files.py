import json

import pytest
import torch

from moefy.errors import MoefyError
from moefy.files import atomic_dir, atomic_path, load_tensors, read_json, save_tensors, write_json


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_old_content_only_on_success(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in target.iterdir()) == ["a"]


def test_outputs_are_readable_by_others(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").stat().st_mode & 0o044


def test_tensor_round_trip_and_damaged_file(tmp_path):
    path = tmp_path / "labels.safetensors"
    save_tensors(path, {"layer.0": torch.arange(6)})
    assert torch.equal(load_tensors(path)["layer.0"], torch.arange(6))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(MoefyError, match="labels.safetensors is truncated"):
        load_tensors(path)
    with pytest.raises(MoefyError, match="does not exist"):
        load_tensors(tmp_path / "missing.safetensors")


def test_read_json_errors(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"test_accuracy": 0.8')
    with pytest.raises(MoefyError, match="metrics.json is not valid JSON"):
        read_json(path)
    path.write_text(json.dumps({"test_accuracy": 0.8}))
    assert read_json(path)["test_accuracy"] == 0.8


def test_a_killed_writers_leftovers_are_cleared_by_the_next_write(tmp_path):
    (tmp_path / ".out.json.abc123.tmp").write_text("half")
    (tmp_path / ".model.xyz.tmp").mkdir()
    write_json(tmp_path / "out.json", {"a": 1})
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out.json"]


@pytest.mark.e2e
def test_tensor_files_are_byte_identical_across_processes(tmp_path):
    """safetensors orders metadata keys by a per-process hash seed; ours must not depend on it."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from moefy.files import save_tensors; "
        "save_tensors(sys.argv[1], {'b': torch.ones(2), 'a': torch.arange(3)}, "
        "{'router': 'mlp', 'num_experts': '48', 'layers': '6', 'tokens': '7'})"
    )
    for i in range(4):
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / f"{i}.safetensors")],
            check=True,
            env={"PYTHONHASHSEED": str(i), "PATH": "/usr/bin:/bin"},
        )
    contents = {(tmp_path / f"{i}.safetensors").read_bytes() for i in range(4)}
    assert len(contents) == 1
    from moefy.files import tensors_metadata

    assert tensors_metadata(tmp_path / "0.safetensors")["num_experts"] == "48"
