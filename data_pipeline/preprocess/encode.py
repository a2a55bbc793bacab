"""Tokenizing: the ``Encoder`` (SentencePiece or Hugging Face ids in the shard dtype), ``split_exact`` (long
texts cut where SentencePiece's tokens do not change), and the pool of tokenizer workers (threads, processes
or inline).

Nothing here changes the output bytes: whatever the backend, batch sizes and worker count, each text
gets the ids the tokenizer gives it whole, and the caller consumes results in submission order.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import chain

import numpy as np

from lmforge.common.tokenizer_files import HF, SENTENCEPIECE, TokenizerFiles, resolve_tokenizer

from ..tokenizer import load_processor
from .settings import PipelineError

CHUNK_CHARS = 16384  # texts longer than this are cut by split_exact
CONT = 4  # item kind of a leading piece of a text cut by split_exact: its tokens precede the next item's
BACKENDS = ("auto", "thread", "process")
BACKEND_ENV = "LMFORGE_TOKENIZE_BACKEND"

Encoded = tuple[np.ndarray, np.ndarray]  # (tokens per text, int64; all ids concatenated, shard dtype)


def resolve_backend(backend: str = "auto", kind: str = SENTENCEPIECE) -> str:
    """Threads when the tokenizer releases the GIL while it encodes, else processes.

    Threads need no pickling of texts and ids between processes, no pool start-up and one copy of the
    model: ~5% faster end to end on 2 cores. SentencePiece releases the GIL around its C++ calls since
    its pybind11 wrapper (google/sentencepiece PRs #1251 and #1266, the latter adding
    ``return_type="numpy"``); the older SWIG wrapper holds it, and threads would then encode one at a
    time. So "auto" takes threads exactly when numpy output exists. Hugging Face ``tokenizers`` releases
    the GIL in ``encode_batch``: threads. ``$LMFORGE_TOKENIZE_BACKEND`` overrides "auto". The output
    bytes never depend on the backend."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto")
    if backend not in BACKENDS:
        raise PipelineError(f"tokenizer backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto" and kind == HF:
        backend = "thread"
    if backend == "auto":
        import sentencepiece as spm

        backend = "thread" if "return_type" in spm.SentencePieceProcessor.Encode.__code__.co_varnames else "process"
    return backend


class Encoder:
    """A tokenizer that turns a batch of texts into ``Encoded`` arrays. ``threads``: SentencePiece's C++
    threads per batch (a Hugging Face tokenizer spreads a batch over its own thread pool)."""

    def __init__(self, tokenizer: str | TokenizerFiles, dtype: np.dtype, threads: int):
        files = resolve_tokenizer(tokenizer)
        self.dtype, self.threads = np.dtype(dtype), threads
        self.hf = None
        if files.kind == HF:
            from .. import hf_tokenizer

            self.hf = hf_tokenizer.load(files.path)
            # encode_batch_fast (tokenizers >= 0.20) skips the character offsets nothing here reads.
            self._hf_encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
            return
        self.sp = load_processor(files.path)
        # SentencePiece >= 0.2.1 can return each text's ids as an int32 buffer wrapped in numpy: no Python
        # int per token to build and then convert (~7% of the tokenizing CPU here). Older versions: lists.
        try:
            probe = self.sp.encode(["a b"], return_type="numpy", num_threads=1)
            self.numpy_out = [list(a) for a in probe] == self.sp.encode(["a b"], num_threads=1)
        except (TypeError, ValueError):
            self.numpy_out = False

    def __call__(self, texts: list[str]) -> Encoded:
        if self.hf is not None:  # no BOS/EOS from the post-processor: the writer appends the EOD
            encodings = self._hf_encode(texts, add_special_tokens=False)
            lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
            flat = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=self.dtype,
                               count=int(lengths.sum()))
            return lengths, flat
        # num_threads explicitly: SentencePiece's default (-1) starts a thread per core in every worker.
        if self.numpy_out:
            arrays = self.sp.encode(texts, return_type="numpy", num_threads=self.threads)
            lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
            flat = np.concatenate(arrays).astype(self.dtype, copy=False) if arrays else np.zeros(0, self.dtype)
            return lengths, flat
        ids = self.sp.encode(texts, num_threads=self.threads)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        return lengths, flat


# The one per-process slot: a process pool pickles the task function and its arguments for every batch,
# and an Encoder (a loaded tokenizer) cannot be pickled, nor should it travel per batch. So each
# worker process builds its Encoder once, in the pool's initializer, and keeps it here.
_PROCESS_ENCODER: Encoder | None = None


def _init_process(tokenizer: TokenizerFiles, dtype: str, threads: int) -> None:
    global _PROCESS_ENCODER
    _PROCESS_ENCODER = Encoder(tokenizer, np.dtype(dtype), threads)


def _encode_in_process(texts: list[str]) -> Encoded:
    assert _PROCESS_ENCODER is not None
    return _PROCESS_ENCODER(texts)


class EncodePool:
    """Encodes batches on ``workers`` threads or processes (``backend`` from ``resolve_backend``), or in
    the calling thread (``"inline"``). ``submit`` returns a function that waits for the batch's result."""

    def __init__(self, backend: str, workers: int, tokenizer: str | TokenizerFiles, dtype: np.dtype, threads: int):
        tokenizer = resolve_tokenizer(tokenizer)
        self._encoder: Encoder | None = None  # this process's (threads and inline)
        self._threads: ThreadPoolExecutor | None = None
        self._processes = None
        if backend == "process":
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self._processes = ctx.Pool(workers, initializer=_init_process,
                                       initargs=(tokenizer, np.dtype(dtype).name, threads))
        else:
            self._encoder = Encoder(tokenizer, dtype, threads)
        if backend == "thread":
            self._threads = ThreadPoolExecutor(workers, thread_name_prefix="tokenize")

    def submit(self, texts: list[str]) -> Callable[[], Encoded]:
        if self._processes is not None:
            return self._processes.apply_async(_encode_in_process, (texts,)).get
        assert self._encoder is not None
        if self._threads is not None:
            return self._threads.submit(self._encoder, texts).result
        result = self._encoder(texts)
        return lambda: result

    def close(self) -> None:
        """Stop the workers (batches not yet consumed are dropped)."""
        if self._processes is not None:
            self._processes.terminate()
            self._processes.join()
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)


def _safe_space(text: str, i: int) -> bool:
    return 0 < i < len(text) - 1 and not text[i - 1].isspace() and not text[i + 1].isspace()


def split_exact(text: str, chunk: int = CHUNK_CHARS, keep_space: bool = False) -> list[str]:
    """Cut a long text into pieces whose tokens, concatenated, equal the tokens of the whole text.

    Cuts are made only at a single space between two non-space characters, and that space is dropped:
    SentencePiece (split_by_whitespace, the default) never merges across the "▁" that starts a word,
    and its dummy prefix re-creates that "▁" at the start of the next piece. So
    ``sum(encode(pieces), []) == encode(text)``, verified on every long document of the test corpus with
    two tokenizers (tests/data_pipeline). Why bother: SentencePiece's BPE is superlinear in the input
    length (a whole book encodes ~2-3x slower than its paragraphs), and pieces let one huge document
    spread over all workers. Text without such spaces (e.g. Chinese) stays whole.

    ``keep_space``: the space starts the next piece instead, for a Hugging Face byte-level BPE whose
    pre-tokenizer always begins a word at such a space (GPT-2's " word" tokens; the tokenizers for which
    ``hf_tokenizer.cuts_before_spaces`` holds): the same cut positions, exact there too. (Hugging Face
    ``tokenizers`` is slower still on a whole book: ~3x per token, and ~0.5 KB of memory per token.)
    """
    out = []
    start, n = 0, len(text)
    while n - start > chunk:
        lo, pos, cut = start + chunk // 2, start + chunk, -1
        while pos > lo:
            pos = text.rfind(" ", lo, pos)
            if pos < 0:
                break
            if _safe_space(text, pos):
                cut = pos
                break
        if cut < 0:  # none in the window: take the next safe space after it, if any
            pos = text.find(" ", start + chunk)
            while pos != -1 and not _safe_space(text, pos):
                pos = text.find(" ", pos + 1)
            if pos == -1:
                break
            cut = pos
        out.append(text[start:cut])
        start = cut if keep_space else cut + 1
    out.append(text[start:])
    return out
