"""Quality rules (data_pipeline/preprocess/quality.py): each rule on crafted documents just inside and
just outside its threshold, Chinese kept, and the rules inside preprocess: removed documents counted by
reason with file:line examples, read = written + skipped, and the same bytes for 1 and 2 workers and 2
MPI ranks."""

from __future__ import annotations

import pytest

from lmforge.data_pipeline.manifest import load_manifest
from lmforge.data_pipeline.preprocess.quality import GROUPS, RULES, check, parse_rules, words
from tests.data_pipeline.test_preprocess import INPUTS, preprocess, same_tree, tok  # noqa: F401 (fixture)
from tests.helpers.paths import BIN, CORPUS

ALL = tuple(RULES)


def prose(n: int, word: str = "river") -> str:
    """n distinct-enough words of length 5-7 (no rule fires on it), on lines of 10 words."""
    ws = [f"{word}{i % 97:02d}" for i in range(n)]
    return "\n".join(" ".join(ws[i:i + 10]) for i in range(0, n, 10))


def tagged(n: int, k: int) -> str:
    """prose(n) with '#' appended to its first k words (the word count stays n)."""
    w = prose(n).split()
    return " ".join(x + "#" if i < k else x for i, x in enumerate(w))


def test_clean_prose_passes_every_rule():
    assert check(prose(200), ALL) is None


@pytest.mark.parametrize("rule,keep,drop", [
    ("words", prose(50), prose(49)),
    ("mean_word_length", " ".join(["abc"] * 60), " ".join(["ab"] * 60)),
    ("mean_word_length", " ".join(["a" * 10] * 60), " ".join(["a" * 11] * 60)),
    ("symbol_ratio", tagged(100, 10), tagged(100, 11)),  # 10 vs 11 symbols in 100 words
    ("bullet_lines", "\n".join(["- item one two three"] * 9 + ["plain line"]),
     "\n".join(["- item one two three"] * 10)),
    ("ellipsis_lines", "\n".join(["a line that trails off..."] * 3 + ["a line that ends."] * 7),
     "\n".join(["a line that trails off..."] * 4 + ["a line that ends."] * 6)),
    ("alpha_words", " ".join(["word"] * 80 + ["1234"] * 20), " ".join(["word"] * 79 + ["1234"] * 21)),
    ("dup_lines", "\n".join([f"line {i}" for i in range(7)] + ["line 0"] * 3),
     "\n".join([f"line {i}" for i in range(6)] + ["line 0"] * 4)),
    ("dup_paragraphs", "\n\n".join([f"para {i}" for i in range(7)] + ["para 0"] * 3),
     "\n\n".join([f"para {i}" for i in range(6)] + ["para 0"] * 4)),
])
def test_each_rule_on_both_sides_of_its_threshold(rule, keep, drop):
    assert check(keep, (rule,)) is None, rule
    assert check(drop, (rule,)) == f"filter-{rule}", rule


def test_top_ngram_rule():
    w = prose(200).split()
    assert check(" ".join(w), ("top_ngram",)) is None
    # "the cat" repeated: a 2-gram covering > 20% of the words' characters.
    spam = " ".join(w[:100] + ["the", "cat"] * 25)
    assert check(spam, ("top_ngram",)) == "filter-top_ngram"


def test_chinese_is_not_one_huge_word():
    f = next(p for p in sorted((CORPUS / "wikipedia" / "zhwiki").rglob("*")) if p.is_file())
    text = f.read_text(encoding="utf-8")[:3000]
    assert len(words(text)) > 500  # each Han character a word
    assert len(text.split()) < 100  # whitespace alone would see a handful of huge "words"
    assert check(text, parse_rules("gopher")) is None


def test_rule_names():
    assert parse_rules("gopher") == GROUPS["gopher"]
    assert parse_rules("repetition,words") == ("words", *GROUPS["repetition"])
    with pytest.raises(ValueError, match="unknown filter rule 'wordz'"):
        parse_rules("wordz")


@pytest.mark.slow
def test_filters_in_preprocess_are_accounted_and_deterministic(tok, tmp_path):  # noqa: F811
    args = ("--filter", "gopher,repetition", "--min-tokens", "20")
    preprocess(tok, tmp_path / "w1", "--workers", "1", *args)
    preprocess(tok, tmp_path / "w2", "--workers", "2", *args)
    same_tree(tmp_path / "w1", tmp_path / "w2")
    preprocess(tok, tmp_path / "mpi", "--workers", "1", *args, launcher=[BIN / "mpirun", "-n", "2"])
    same_tree(tmp_path / "w1", tmp_path / "mpi")
    m = load_manifest(tmp_path / "w1")
    r = m["records"]
    assert r["read"] == r["written"] + r["skipped"] and r["skipped"] == sum(m["skipped"].values())
    removed = {k: v for k, v in m["skipped"].items() if k.startswith("filter-")}
    assert removed, m["skipped"]
    for reason in removed:
        assert m["skip_examples"][reason] and ":" in m["skip_examples"][reason][0]
    assert m["settings"]["filters"] == list(parse_rules("gopher,repetition")) and m["settings"]["min_tokens"] == 20
    plain = preprocess(tok, tmp_path / "plain", "--workers", "1")
    assert plain.returncode == 0
    p = load_manifest(tmp_path / "plain")
    assert "filters" not in p["settings"]  # unchanged record without filters: older outputs stay resumable
    assert p["records"]["written"] - r["written"] == sum(removed.values())
    # A rerun into the filtered output with other filters is refused (it would mix two corpora).
    bad = preprocess(tok, tmp_path / "w1", "--workers", "1", "--filter", "words", check=False)
    assert bad.returncode == 2 and "different job" in bad.stderr


@pytest.mark.slow
def test_min_tokens_counts_what_it_removes(tok, tmp_path):  # noqa: F811
    preprocess(tok, tmp_path / "o", "--workers", "2", "--min-tokens", "300")
    m = load_manifest(tmp_path / "o")
    r = m["records"]
    assert m["skipped"].get("filter-min_tokens", 0) > 0, m["skipped"]
    assert r["read"] == r["written"] + r["skipped"]
