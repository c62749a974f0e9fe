"""Writing an exported Hugging Face folder as a GGUF file, with llama.cpp's own converter.

The converter runs as a subprocess (its own imports, its own gguf-py), its log captured: a
failure (an architecture or tokenizer it does not know) becomes a MoefyError with its last lines.
The file appears only once complete.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from moefy.errors import MoefyError
from moefy.files import atomic_path
from moefy.serving.converter import SCRIPT, llama_cpp_source

# moefy's names for the converter's --outtype values: the element type of the weight matrices
# (norms and other vectors stay F32 in every type).
OUTTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}
TAIL_LINES = 15
# The converter's failures a user can act on: what its log says, what to do.
HINTS = {
    "is not supported": "llama.cpp has no such architecture; export the model as a class llama.cpp serves",
    "pre-tokenizer was not recognized": "llama.cpp knows tokenizers by a hash of their output and not this one; "
    "export the model with its base model's own tokenizer files",
}


def _tail(text: str) -> str:
    return "\n".join(text.strip().splitlines()[-TAIL_LINES:])


def _hint(log: str) -> str:
    return next((hint for pattern, hint in HINTS.items() if pattern in log), "its last lines say why")


def to_gguf(
    folder: str | os.PathLike, out_path: str | os.PathLike, outtype: str, checkout: str | os.PathLike | None = None
) -> Path:
    """Convert the Hugging Face model folder `folder` (config, safetensors, tokenizer) to the GGUF file
    `out_path` with weights in `outtype` (one of OUTTYPES); `checkout`: a llama.cpp checkout to take
    the converter from (see moefy.serving.converter). Returns `out_path`."""
    folder, out_path = Path(folder), Path(out_path)
    if outtype not in OUTTYPES:
        raise MoefyError(f"GGUF type {outtype!r} is not one moefy writes; choose one of {', '.join(OUTTYPES)}")
    if not (folder / "config.json").is_file():
        raise MoefyError(f"{folder} has no config.json; give the folder of an exported model (config, weights and tokenizer)")
    source = llama_cpp_source(checkout)
    with atomic_path(out_path) as tmp:
        cmd = [sys.executable, str(source / SCRIPT), str(folder), "--outfile", str(tmp), "--outtype", OUTTYPES[outtype]]
        # The converter's own gguf-py (not an installed gguf of another version); no hub look-ups.
        env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("NO_LOCAL_GGUF", None)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            log = proc.stdout + proc.stderr
            raise MoefyError(
                f"llama.cpp's converter could not write {folder} as GGUF {outtype} (exit status {proc.returncode}): "
                f"{_hint(log)}. Its last lines:\n{_tail(log)}"
            )
        if tmp.stat().st_size == 0:
            raise MoefyError(
                f"llama.cpp's converter exited cleanly but wrote nothing for {folder}:\n{_tail(proc.stdout + proc.stderr)}"
            )
    return out_path
