"""A corpus with planted duplicates, for the deduplication tests and ``benchmarks/dedup_quality.py``.

``plant(docs, seed)`` returns (originals, copies): ``originals`` are the documents as given; ``copies``
are (kind, index of the original, text) for altered copies of some of them, to be written to a later
file than the originals (so the original is the first in input order and must be the one kept):

- ``exact``: whitespace re-spaced and the text in Unicode NFD (equal after ``--dedup exact``'s NFC and
  whitespace normalisation);
- ``edit1`` / ``edit3`` / ``edit5``: 1, 3 or 5 per cent of the words replaced by other words;
- ``reorder``: paragraphs (lines) shuffled;
- ``header``: a different first line prepended (a mirror's or dump's header).

``jaccard(a, b, n)`` is the true Jaccard similarity of two documents' shingle sets (what MinHash
estimates), so a test or benchmark can say which planted pairs the LSH settings should find.
"""

from __future__ import annotations

import random
import unicodedata

from lmforge.data_pipeline.preprocess.dedup import shingles

KINDS = ("exact", "edit1", "edit3", "edit5", "reorder", "header")
HEADERS = ("From Wikipedia, the free encyclopedia (mirror)", "Retrieved from the 2019 dump",
           "This article is reproduced under CC BY-SA 4.0")


def jaccard(a: str, b: str, n: int = 5) -> float:
    x, y = set(shingles(a, n)), set(shingles(b, n))
    return len(x & y) / max(len(x | y), 1)


def _edit(text: str, frac: float, rng: random.Random, vocab: list[str]) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, round(len(words) * frac))):
        words[i] = rng.choice(vocab)
    return " ".join(words)


def _reorder(text: str, rng: random.Random) -> str:
    paras = text.split("\n")
    order = list(range(len(paras)))
    while order == sorted(order) and len(order) > 1:
        rng.shuffle(order)
    return "\n".join(paras[i] for i in order)


def plant(docs: list[str], seed: int = 0, per_kind: int = 5, min_words: int = 200
          ) -> list[tuple[str, int, str]]:
    """Altered copies of distinct long documents of ``docs``: ``per_kind`` of each kind (fewer if
    ``docs`` has too few documents of at least ``min_words`` words, and for ``reorder`` of at least 4
    lines)."""
    rng = random.Random(seed)
    vocab = sorted({w for d in docs for w in d.split()[:200] if w.isalpha()})
    long = [i for i, d in enumerate(docs) if len(d.split()) >= min_words]
    rng.shuffle(long)
    copies: list[tuple[str, int, str]] = []
    pool = iter(long)
    for kind in KINDS:
        taken = 0
        for i in pool:
            d = docs[i]
            if kind == "reorder" and d.count("\n") < 3:
                continue
            if kind == "exact":
                text = "  " + unicodedata.normalize("NFD", d).replace(" ", " \t ") + "\n\n"
            elif kind.startswith("edit"):
                text = _edit(d, int(kind[4:]) / 100, rng, vocab)
            elif kind == "reorder":
                text = _reorder(d, rng)
            else:
                text = f"{rng.choice(HEADERS)}\n{d}"
            copies.append((kind, i, text))
            taken += 1
            if taken == per_kind:
                break
    return copies
