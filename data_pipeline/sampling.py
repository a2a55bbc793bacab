"""A bounded-memory, seeded sample of a document stream's lines: what both tokenizer trainers (SentencePiece
and Hugging Face byte-level BPE) learn from.

The stream (any format ``data_pipeline.readers`` reads) is cut into lines; lines longer than SentencePiece's
``max_sentence_length`` are split at whitespace so nothing is silently dropped by the trainer; a seeded
reservoir sample (Algorithm R) of at most ``max_sentences`` lines and ``max_bytes`` bytes is kept, so
memory is bounded whatever the corpus size.
"""

from __future__ import annotations

import random

from .readers import DOC, LAST, PART, ReadOptions, Source, iter_documents

MAX_SENTENCE_BYTES = 4000  # SentencePiece's default max_sentence_length is 4192 bytes


def split_long_line(line: str, limit: int = MAX_SENTENCE_BYTES) -> list[str]:
    """Split ``line`` into pieces of at most ``limit`` UTF-8 bytes, preferring whitespace cuts."""
    if len(line.encode("utf-8")) <= limit:
        return [line]
    out = []
    while line:
        # Take at most `limit` bytes' worth of characters (<= limit chars; chars can be 1-4 bytes).
        cut = limit
        while len(line[:cut].encode("utf-8")) > limit:
            cut = cut * 3 // 4
        if cut < len(line):
            space = line.rfind(" ", cut // 2, cut)
            if space > 0:
                cut = space
        out.append(line[:cut])
        line = line[cut:].lstrip(" ")
    return [p for p in out if p.strip()]


def sample_sentences(
    sources: list[Source],
    opts: ReadOptions,
    max_sentences: int,
    max_bytes: int,
    seed: int,
) -> tuple[list[str], dict]:
    """Reservoir-sample lines from the stream. Deterministic for a seed and input order."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    res_bytes = 0
    seen = 0
    docs = 0
    for src in sources:
        for kind, text, _loc in iter_documents(src, opts):
            if kind not in (DOC, PART, LAST):
                continue
            docs += kind != PART
            for line in text.split("\n"):
                if not line.strip():
                    continue
                for piece in split_long_line(line):
                    seen += 1
                    if len(reservoir) < max_sentences and res_bytes < max_bytes:
                        reservoir.append((seen, piece))
                        res_bytes += len(piece)
                    else:
                        j = rng.randrange(seen)
                        if j < len(reservoir):
                            res_bytes += len(piece) - len(reservoir[j][1])
                            reservoir[j] = (seen, piece)
    reservoir.sort()  # stream order: a sample that reads like the corpus, independent of hash order
    stats = {"documents": docs, "lines_seen": seen, "lines_sampled": len(reservoir), "sample_chars": res_bytes}
    return [s for _, s in reservoir], stats
