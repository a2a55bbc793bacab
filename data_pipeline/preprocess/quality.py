"""Document quality rules (``preprocess --filter RULE,...``): Gopher-style quality and repetition rules
(Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training Gopher", appendix
A; the thresholds below are the paper's), each a pure function of one document's text, so the output
bytes still depend only on inputs, tokenizer and settings, never on worker or rank counts.

Off by default: which rules suit a corpus is a decision about the data (the Gopher rules were tuned on
web text; they drop poetry, tables, code and lists that a book or a wiki may want). A removed document
is counted as skipped with the reason ``filter-<rule>`` and a ``file:line`` example, like every other
skip.

Words are whitespace-separated runs, except that each CJK character (Han, kana, Hangul) counts as one
word: Chinese or Japanese text has no spaces and must not become "one huge word". The word-length rule
is not applied to documents whose words are mostly CJK characters (their mean "word" length is 1).

Rules (``gopher`` = all quality rules, ``repetition`` = all repetition rules):

=====================  ==========================================================================
rule                   a document is removed when
=====================  ==========================================================================
``words``              it has fewer than 50 or more than 100,000 words
``mean_word_length``   its mean word length is outside 3..10 characters (non-CJK documents)
``symbol_ratio``       '#' and ellipses ('...', '…') number more than 0.1 per word
``bullet_lines``       more than 90% of its non-empty lines start with a bullet (•, ●, -, *, ‣, ◦)
``ellipsis_lines``     more than 30% of its non-empty lines end with an ellipsis
``alpha_words``        fewer than 80% of its words contain a letter
``dup_lines``          more than 30% of its non-empty lines are repeats of an earlier line
``dup_paragraphs``     more than 30% of its paragraphs (blank-line separated) are repeats
``top_ngram``          the most frequent word 2-, 3- or 4-gram covers more than 20%, 18%, 16% of the
                       characters of all words
=====================  ==========================================================================

``--min-tokens N`` (a separate setting: it needs the tokenizer) removes documents of fewer than N tokens
(reason ``filter-min_tokens``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORD_RE = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_CJK_RE = re.compile(rf"[{_CJK}]")
_BULLETS = ("•", "●", "-", "*", "‣", "◦", "–")
_ELLIPSES = ("...", "…")


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text)


def _lines(text: str) -> list[str]:
    return [x.strip() for x in text.split("\n") if x.strip()]


def _words_rule(text: str, w: list[str]) -> bool:
    return not 50 <= len(w) <= 100_000


def _mean_word_length(text: str, w: list[str]) -> bool:
    if not w or sum(1 for x in w if _CJK_RE.fullmatch(x)) * 2 > len(w):
        return False
    return not 3 <= sum(map(len, w)) / len(w) <= 10


def _symbol_ratio(text: str, w: list[str]) -> bool:
    symbols = text.count("#") + text.count("...") + text.count("…")
    return symbols > 0.1 * max(len(w), 1)


def _bullet_lines(text: str, w: list[str]) -> bool:
    lines = _lines(text)
    return bool(lines) and sum(x.startswith(_BULLETS) for x in lines) > 0.9 * len(lines)


def _ellipsis_lines(text: str, w: list[str]) -> bool:
    lines = _lines(text)
    return bool(lines) and sum(x.endswith(_ELLIPSES) for x in lines) > 0.3 * len(lines)


def _alpha_words(text: str, w: list[str]) -> bool:
    return bool(w) and sum(any(c.isalpha() for c in x) for x in w) < 0.8 * len(w)


def _dup_fraction(items: list[str]) -> float:
    seen: set[str] = set()
    dup = 0
    for x in items:
        dup += x in seen
        seen.add(x)
    return dup / len(items) if items else 0.0


def _dup_lines(text: str, w: list[str]) -> bool:
    return _dup_fraction(_lines(text)) > 0.3


def _dup_paragraphs(text: str, w: list[str]) -> bool:
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return _dup_fraction(paras) > 0.3


def _top_ngram(text: str, w: list[str]) -> bool:
    total = sum(map(len, w))
    if not total:
        return False
    for n, limit in ((2, 0.20), (3, 0.18), (4, 0.16)):
        if len(w) < n:
            break
        counts = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
        gram, c = counts.most_common(1)[0]
        if c > 1 and c * sum(map(len, gram)) > limit * total:
            return True
    return False


RULES: dict[str, Callable[[str, list[str]], bool]] = {
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


def check(text: str, rules: tuple[str, ...]) -> str | None:
    """The skip reason (``filter-<rule>``) of the first rule that removes ``text``, or None to keep it."""
    if not rules:
        return None
    w = words(text)
    for r in rules:
        if RULES[r](text, w):
            return f"filter-{r}"
    return None
