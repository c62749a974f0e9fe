"""Reading and writing step outputs so that a killed job never leaves a file that looks complete.

Every output is written to a hidden temporary sibling and renamed into place (rename is atomic
on one filesystem). Readers turn a missing or damaged file into a MoefyError that says which
step makes it and how to regenerate it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moefy.errors import MoefyError

if TYPE_CHECKING:
    import torch

# torch and safetensors are imported where tensors are read or written: the steps that only handle
# text and tables (data, report) then start without them, two seconds sooner.


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _regenerate_hint(path: Path) -> str:
    return f"delete it and rerun `snakemake --cores all {path}` (or the step that writes it) to regenerate it"


def _remove_leftovers(path: Path) -> None:
    """Temporary siblings that a killed writer of `path` left behind."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should read like any file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MoefyError(f"{path} does not exist; run the step that writes it first (`snakemake --cores all {path}`)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoefyError(f"{path} is not valid JSON ({err}); {_regenerate_hint(path)}") from None


METADATA_KEY = "moefy"


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose bytes depend only on its content.

    safetensors writes metadata keys in hash order, which changes from process to process, so the
    metadata travels as one sorted JSON string under a single key.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {METADATA_KEY: json.dumps(metadata or {}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file (never pickle), with a clear error if it is missing or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MoefyError(f"{path} does not exist; run the step that writes it first (`snakemake --cores all {path}`)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise MoefyError(f"{path} is truncated or not a safetensors file ({err}); {_regenerate_hint(path)}") from None


def tensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise MoefyError(f"{path} is truncated or not a safetensors file ({err}); {_regenerate_hint(Path(path))}") from None
    if METADATA_KEY not in stored:
        raise MoefyError(f"{path} was not written by moefy (no '{METADATA_KEY}' metadata); {_regenerate_hint(Path(path))}")
    return json.loads(stored[METADATA_KEY])
