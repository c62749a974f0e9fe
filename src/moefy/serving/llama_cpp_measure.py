"""Measuring a GGUF file in llama.cpp (through llama-cpp-python): perplexity, greedy text, tokens/s.

Perplexity predicts the same tokens as moefy's causal_lm metric does with the Hugging Face model:
each text is tokenized by the GGUF's own tokenizer with its special tokens (BOS first exactly
when the file's tokenizer says to add it, as the Hugging Face tokenizer does), cut to
`max_tokens`, and every token after the first is predicted from those before it;
perplexity = exp(summed negative log-likelihood / predicted tokens). Logits come from llama.cpp
itself, one text at a time (its own cache emptied between texts).

Speed is what llama.cpp's own benchmark measures: prompt processing (one batch of
`prompt_tokens` tokens) and batch-1 decode (`decode_tokens` single-token steps after it), each
after a warm-up, the median of `repeats` runs, as tokens per second.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moefy.errors import MoefyError

# llama.cpp's KV cache element types (ggml type ids): F16 is llama.cpp's default; F32 makes an F32
# GGUF compute what the Hugging Face model computes to float rounding.
KV_CACHE_TYPES = {"F16": 1, "F32": 0}


def _load_error(path: Path) -> str:
    """llama.cpp's own reason a file does not load (llama-cpp-python hides its log when not verbose)."""
    code = f"import llama_cpp; llama_cpp.Llama({str(path)!r}, n_ctx=8, verbose=True)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    log = proc.stderr.split("Traceback")[0]  # llama.cpp's lines, not the Python error that follows them
    lines = [line for line in log.splitlines() if "error" in line.lower() or "failed" in line.lower()]
    return "\n".join(lines[-5:]) or log.strip()[-800:]


@contextmanager
def open_gguf(
    path: str | os.PathLike, threads: int, context: int, logits: bool = False, kv_cache: str = "F16"
) -> Iterator[object]:
    """A llama_cpp.Llama on `path` with `context` tokens of context, computing on `threads` threads;
    `logits`: keep every position's logits (perplexity, greedy), not only the last one's (speed)."""
    import llama_cpp

    path = Path(path)
    if not path.is_file():
        raise MoefyError(f"{path} does not exist; write it first (moefy.serving.gguf.to_gguf or `python -m moefy.steps.gguf`)")
    if kv_cache not in KV_CACHE_TYPES:
        raise MoefyError(
            f"KV cache type {kv_cache!r} is not one llama.cpp offers here; choose one of {', '.join(KV_CACHE_TYPES)}"
        )
    if threads < 1 or context < 2:
        raise MoefyError(f"threads ({threads}) must be at least 1 and context ({context}) at least 2 tokens")
    try:
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=context,
            n_batch=context,
            n_ubatch=context,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=logits,
            type_k=KV_CACHE_TYPES[kv_cache],
            type_v=KV_CACHE_TYPES[kv_cache],
            verbose=False,
        )
    except ValueError:
        raise MoefyError(
            f"llama.cpp could not load {path}; write it again with this llama-cpp-python's converter "
            f"(`python -m moefy.steps.gguf`). llama.cpp's log says:\n{_load_error(path)}"
        ) from None
    try:
        yield llm
    finally:
        llm.close()


def tokenize(llm, text: str, max_tokens: int) -> list[int]:
    """`text` as the GGUF's tokenizer encodes it, with its special tokens (BOS when it adds one), cut to `max_tokens`."""
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)[:max_tokens]


def logits_of(llm, ids: Sequence[int]) -> np.ndarray:
    """[len(ids), vocab] float32 logits of a fresh sequence (the file must be open with logits=True)."""
    if len(ids) > llm.n_ctx():
        raise MoefyError(
            f"{len(ids)} tokens do not fit the context of {llm.n_ctx()}; cut the text or open the file with more context"
        )
    llm.reset()
    llm.eval(list(ids))
    return _finite(np.array(llm.scores[: len(ids)], dtype=np.float32))


def _finite(logits: np.ndarray) -> np.ndarray:
    if not np.isfinite(logits).all():
        raise MoefyError(
            "llama.cpp computed non-finite logits for this file. A shared expert's sigmoid gate with all-zero "
            "weights does this (llama.cpp computes sigmoid(x) as silu(x) / x, 0/0 at x = 0): export such a gate with "
            "tiny non-zero weights (1e-20 gives sigmoid 0.5 exactly in float32) instead"
        )
    return logits


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(llm, texts: Sequence[str], max_tokens: int) -> dict:
    """Perplexity over `texts` (see the module docstring for the tokens predicted); texts of under
    two tokens predict nothing and are counted in `skipped_texts`."""
    nll, predicted, skipped = 0.0, 0, 0
    for text in tqdm(texts, desc="llama.cpp perplexity", unit="text", mininterval=5):
        ids = tokenize(llm, text, max_tokens)
        if len(ids) < 2:
            skipped += 1
            continue
        log_probs = _log_softmax(logits_of(llm, ids)[:-1])
        nll -= float(log_probs[np.arange(len(ids) - 1), ids[1:]].sum())
        predicted += len(ids) - 1
    if predicted == 0:
        raise MoefyError(f"none of the {len(texts)} texts has two tokens to predict from; give longer texts")
    return {
        "perplexity": float(np.exp(nll / predicted)),
        "nll_sum": nll,
        "predicted_tokens": predicted,
        "texts": len(texts),
        "skipped_texts": skipped,
    }


def greedy(llm, prompt: str, new_tokens: int) -> dict:
    """`new_tokens` tokens chosen by argmax after `prompt` (encoded as `tokenize` does), with no stop
    at end-of-text, so the same count comes back as from Hugging Face generate with min_new_tokens."""
    ids = tokenize(llm, prompt, llm.n_ctx())
    if len(ids) + new_tokens > llm.n_ctx():
        raise MoefyError(f"a {len(ids)}-token prompt and {new_tokens} new tokens do not fit the context of {llm.n_ctx()}")
    llm.reset()
    llm.eval(ids)
    tokens: list[int] = []
    for _ in range(new_tokens):
        tokens.append(int(np.argmax(_finite(llm.scores[llm.n_tokens - 1]))))
        llm.eval([tokens[-1]])
    return {"prompt_ids": ids, "tokens": tokens, "text": llm.detokenize(tokens).decode("utf-8", errors="replace")}


def _timed(call, *args) -> float:
    start = time.perf_counter()
    call(*args)
    return time.perf_counter() - start


def speed(path: str | os.PathLike, threads: int, prompt_tokens: int = 128, decode_tokens: int = 64, repeats: int = 3) -> dict:
    """Tokens/s of prompt processing and of batch-1 decode (see the module docstring), on fixed
    pseudo-random token ids: the speed does not depend on which tokens they are."""
    if min(prompt_tokens, decode_tokens, repeats) < 1:
        raise MoefyError(
            f"prompt_tokens, decode_tokens and repeats must be at least 1 (got {prompt_tokens}, {decode_tokens}, {repeats})"
        )
    with open_gguf(path, threads, context=prompt_tokens + decode_tokens) as llm:
        ids = np.random.default_rng(0).integers(0, llm.n_vocab(), prompt_tokens + decode_tokens).tolist()
        prompt, steps = ids[:prompt_tokens], ids[prompt_tokens:]

        def run() -> tuple[float, float]:
            llm.reset()
            prompt_s = _timed(llm.eval, prompt)
            return prompt_s, sum(_timed(llm.eval, [token]) for token in steps)

        run()  # warm-up: first-touch of the weights, thread pool start
        times = [run() for _ in tqdm(range(repeats), desc="llama.cpp speed", unit="run", mininterval=5)]
    prompt_s = statistics.median(t[0] for t in times)
    decode_s = statistics.median(t[1] for t in times)
    return {
        "prompt_tokens_per_s": prompt_tokens / prompt_s,
        "decode_tokens_per_s": decode_tokens / decode_s,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "threads": threads,
        "prompt_seconds": [t[0] for t in times],
        "decode_seconds": [t[1] for t in times],
    }
