"""Quality rules (data_pipeline/preprocess/quality.py): each rule on crafted documents just inside and
just outside its threshold, in English and Chinese; real books (English, German, Chinese, whole or of more
than 100,000 words or characters) kept by every rule, long junk removed by its pieces; and the rules
inside preprocess: removed documents counted by reason with file:line examples and each listed in
OUT/filtered/ with what was measured, read = written + skipped, and the same bytes for 1 and 2 workers
and 2 MPI ranks."""

from __future__ import annotations

import re

import pytest

from lmforge.data_pipeline.manifest import load_manifest
from lmforge.data_pipeline.preprocess.quality import (
    GROUPS,
    PIECE_WORDS,
    RULES,
    _cut,
    check,
    judge,
    parse_rules,
    words,
)
from lmforge.data_pipeline.readers import DOC, ReadOptions, expand_inputs, iter_documents
from tests.data_pipeline.test_preprocess import INPUTS, preprocess, same_tree, tok  # noqa: F401 (fixture)
from tests.helpers.paths import BIN, CORPUS, SAMPLE

ALL = tuple(RULES)
GOPHER_REPETITION = parse_rules("gopher,repetition")
# Real books (tests/data/corpus/README.md): Pride and Prejudice whole (122,000 words), the Debian Reference
# in German (91,000 words) and Chinese (103,467 Han characters: over 100,000 "words" when each character
# counted as one); the English cuts and the demo's three whole books (Frankenstein: 75,000 words).
BOOKS = [CORPUS / "books_en_de_zh", CORPUS / "books", SAMPLE / "books"]
_HAN = re.compile(r"[\u4e00-\u9fff]")


def book_texts() -> dict[str, str]:
    """Every book as preprocess reads it (--strip-gutenberg): file name -> text."""
    return {loc.rsplit("/", 1)[1].split(":")[0]: t for s in expand_inputs([str(p) for p in BOOKS])
            for k, t, loc in iter_documents(s, ReadOptions(strip_gutenberg=True)) if k == DOC}


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


def zh_ellipses(k: int) -> str:
    """120 Han characters (80 words) with an ellipsis "……" after each of the first k groups of 8."""
    return "".join("天地玄黃宇宙洪荒" + ("……" if i < k else "") for i in range(15))


@pytest.mark.parametrize("rule,keep,drop", [
    # 50 words: 75 Han characters (1.5 a word), not 50 "one-character words"
    ("words", "".join(chr(0x4E00 + i) for i in range(75)), "".join(chr(0x4E00 + i) for i in range(74))),
    ("symbol_ratio", zh_ellipses(8), zh_ellipses(9)),  # 8 or 9 ellipses in 80 words
])
def test_cjk_rules_count_words_not_characters(rule, keep, drop):
    assert check(keep, (rule,)) is None, rule
    assert check(drop, (rule,)) == f"filter-{rule}", rule


def test_cjk_words_carry_their_punctuation():
    assert words("「好。」他笑道：“來！”") == ["「好。」", "他", "笑", "道：“", "來！”"]
    assert words("안녕하세요 세계") == ["안녕하세요", "세계"]  # Hangul is written with spaces
    dialogue = "「好。」他笑道：“來！”\n" * 40
    assert check(dialogue, ("alpha_words", "mean_word_length")) is None  # punctuation is no "word"


def test_real_books_are_kept_by_every_rule():
    """The books that version 1 of the rules removed for their length (more than 100,000 words, a Chinese
    character counted as a word) and every other book of the test corpora: kept by gopher,repetition."""
    books = book_texts()
    assert sorted(books) == ["11-0.txt", "1342-0.txt", "1342-0.txt.gz", "84-0.txt", "debian-reference.de.txt.gz",
                             "debian-reference.zh-cn.txt.gz", "input.txt", "pg1952.txt"]  # (74-0.txt: not UTF-8)
    assert len(books["1342-0.txt.gz"].split()) > 120_000  # the whole of Pride and Prejudice
    zh = books["debian-reference.zh-cn.txt.gz"]
    assert len(_HAN.findall(zh)) > 100_000 and len(words(zh)) > 100_000  # version 1 removed it for its length
    assert "Verschlüsselte Passwörter erstellen" in books["debian-reference.de.txt.gz"]
    for name, text in books.items():
        assert judge(text, GOPHER_REPETITION) is None, (name, judge(text, GOPHER_REPETITION))
    pieces, total, _ = _cut(books["1342-0.txt.gz"])  # judged in 12 pieces of about 10,000 words
    assert len(pieces) == int(total // PIECE_WORDS) == 12
    assert all(0.8 * PIECE_WORDS < p.n < 1.3 * PIECE_WORDS for p in pieces), [p.n for p in pieces]


def test_long_junk_is_removed_by_its_pieces():
    """Long documents are judged by pieces of about 10,000 words: removed when more than half of them
    fail (the reason: the rule that failed the most), kept when some junk is a small part of them."""
    bullets = "\n".join(f"- item {i} of the list of links" for i in range(4_000))  # 32,000 words
    tags = "\n".join(" ".join(f"#tag{(i + j) % 50} word" for j in range(5)) for i in range(2_400))
    spam = "\n".join(f"Buy cheap pills online today at shop {i % 7}" for i in range(4_000))
    ngram = "\n".join(f"click here to win prize {i}" for i in range(5_000))
    for text, rule in ((bullets, "bullet_lines"), (tags, "symbol_ratio"), (spam, "dup_lines"), (ngram, "top_ngram")):
        v = judge(text, GOPHER_REPETITION)
        assert v is not None and v.reason == f"filter-{rule}", (rule, v)
        assert re.match(r"pieces=\d+/\d+ ", v.detail), v.detail
    book = book_texts()["1342-0.txt.gz"]
    assert judge(book + "\n" + bullets[: len(bullets) // 3], GOPHER_REPETITION) is None  # an appendix of links
    assert judge(book[:50_000] + "\n" + bullets, GOPHER_REPETITION).reason == "filter-bullet_lines"  # mostly links
    # The short junk the rules exist for is still removed whole (with what was measured).
    assert judge("Home | About | Contact\nCopyright 2024", GOPHER_REPETITION) == (
        "filter-words", "words=7 chars=37")


def test_rule_names():
    assert parse_rules("gopher") == GROUPS["gopher"]
    assert parse_rules("repetition,words") == ("words", *GROUPS["repetition"])
    with pytest.raises(ValueError, match="unknown filter rule 'wordz'"):
        parse_rules("wordz")


def filtered_rows(out) -> list[list[str]]:
    """The rows of OUT/filtered/*.tsv in unit order: [reason, file:line, detail]."""
    return [row.split("\t") for f in sorted((out / "filtered").glob("unit_*.tsv"))
            for row in f.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_filters_in_preprocess_are_accounted_and_deterministic(tok, tmp_path):  # noqa: F811
    # 100 KB units: the WikiTasks file is read in two byte ranges, the second counting lines from its
    # start, and its stubs' locations in the list must still be file lines.
    args = ("--filter", "gopher,repetition", "--min-tokens", "20", "--unit-bytes", "100k")
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
    # Every removed document is listed with what the rule measured, at its file:line, in input order.
    rows = filtered_rows(tmp_path / "w1")
    assert len(rows) == sum(removed.values()) and all(len(r) == 3 for r in rows)
    assert [e["file"] for e in m["removed_lists"]["filtered"]] == sorted(
        str(f.relative_to(tmp_path / "w1")) for f in (tmp_path / "w1" / "filtered").glob("*.tsv"))
    assert sum(e["documents"] for e in m["removed_lists"]["filtered"]) == len(rows)
    text_at = {loc: t for src in expand_inputs([str(p) for p in INPUTS])
               for k, t, loc in iter_documents(src, ReadOptions()) if k == DOC}
    for why, loc, detail in rows:
        if why == "filter-min_tokens":
            assert loc in text_at and re.fullmatch(r"tokens=\d+", detail), (loc, detail)
        else:
            assert judge(text_at[loc], GOPHER_REPETITION) == (why, detail), (loc, why, detail)
    wiki = [loc for _, loc, _ in rows if "WikiTasks" in loc]
    assert max(int(loc.rsplit(":", 1)[1]) for loc in wiki) > 2000  # stubs of the second range: file lines
    for why in removed:  # the manifest's examples are the list's first rows of each reason
        assert m["skip_examples"][why] == [loc for w, loc, _ in rows if w == why][:5]
    plain = preprocess(tok, tmp_path / "plain", "--workers", "1")
    assert plain.returncode == 0
    p = load_manifest(tmp_path / "plain")
    assert "filters" not in p["settings"]  # unchanged record without filters: older outputs stay resumable
    assert "removed_lists" not in p and not (tmp_path / "plain" / "filtered").exists()
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


@pytest.mark.slow
def test_real_books_kept_by_preprocess(tok, tmp_path):  # noqa: F811
    """The real preprocess (--strip-gutenberg, --filter gopher,repetition) on the English, German and
    Chinese books, a .txt.gz among them: every book written, none filtered, no list of removals."""
    out = tmp_path / "books"
    preprocess(tok, out, "--workers", "2", "--strip-gutenberg", "--filter", "gopher,repetition", inputs=BOOKS)
    m = load_manifest(out)
    assert not [why for why in m["skipped"] if why.startswith("filter-")], m["skipped"]
    assert m["records"]["written"] == len(book_texts()) == 8 and m["skipped"] == {"invalid_utf8": 1}
    assert "removed_lists" not in m and not (out / "filtered").exists()
