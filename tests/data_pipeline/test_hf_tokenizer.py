"""Hugging Face tokenizers (tokenizer.json) in the data pipeline, with the real ``tokenizers`` library:
``train-tokenizer --type hf-bpe``, how ``--tokenizer`` is recognised (a SentencePiece output's own
tokenizer.json record included) and its errors, the end-of-document and vocabulary size read from the
tokenizer's files, and preprocess/merge/inspect/verify with one."""

from __future__ import annotations

import filecmp
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from lmforge.common.tokenizer_files import HF, SENTENCEPIECE, TokenizerError, resolve_tokenizer
from lmforge.data_pipeline.hf_tokenizer import train_hf_bpe
from lmforge.data_pipeline.indexed_dataset import IndexedDataset
from lmforge.data_pipeline.manifest import load_manifest, shard_prefixes
from lmforge.data_pipeline.preprocess import CHUNK_CHARS, split_exact
from lmforge.data_pipeline.tokenizer import tokenizer_info
from lmforge.data_pipeline.tools import inspect, merge, verify
from tests.helpers.paths import CORPUS, SAMPLE
from tests.helpers.process import run_cmd

PY = sys.executable
TRAIN_INPUTS = [SAMPLE / "wikipedia", SAMPLE / "books"]


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory) -> Path:
    """A 2000-id byte-level BPE of the sample corpus (tokenizer.json + tokenizer_config.json)."""
    return train_hf_bpe([str(p) for p in TRAIN_INPUTS], str(tmp_path_factory.mktemp("hftok")), vocab_size=2000)


def _tokenizers(path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def test_hf_bpe_training_is_deterministic_lossless_and_loadable(hf_tok, tmp_path):
    p = run_cmd([PY, "-m", "lmforge.data_pipeline", "train-tokenizer", "--type", "hf-bpe", "--input", *TRAIN_INPUTS,
                 "--vocab-size", "2000", "--output", tmp_path])
    assert "vocab 2000" in p.stdout
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (hf_tok.parent / name).read_bytes(), name
    record = json.loads((tmp_path / "tokenizer_training.json").read_text())
    assert record["file"] == "tokenizer.json" and record["settings"]["type"] == "hf-bpe"
    assert record["sample"]["lines_sampled"] > 1000 and len(record["sources"]) > 3
    info = tokenizer_info(tmp_path)
    assert (info["vocab_size"], info["bos_id"], info["eos_id"], info["unk_id"], info["pad_id"]) == (2000, 0, 1, -1, -1)
    tok = _tokenizers(hf_tok)
    text = "naïve 数学 ½ \u2603 tabs\tand  spaces\n🚀 2024"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text  # byte level: lossless
    assert tok.encode("hi").ids[0] == 0  # the post-processor adds BOS when asked to (transformers does)

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (hf.eos_token_id, hf.bos_token_id, len(hf)) == (1, 0, 2000)
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False).ids

    # One output directory holds one kind of tokenizer.
    with pytest.raises(TokenizerError, match="holds a Hugging Face tokenizer"):
        from lmforge.data_pipeline.tokenizer import train_tokenizer

        train_tokenizer([str(SAMPLE / "wikipedia")], str(tmp_path), vocab_size=500)
    sp_dir = tmp_path / "sp"
    (sp_dir).mkdir()
    (sp_dir / "tokenizer.model").write_bytes(b"x")
    with pytest.raises(TokenizerError, match="holds a SentencePiece tokenizer"):
        train_hf_bpe([str(SAMPLE / "wikipedia")], str(sp_dir), vocab_size=500)
    with pytest.raises(TokenizerError, match="below the 256 bytes"):
        train_hf_bpe([str(SAMPLE / "wikipedia")], str(tmp_path / "small"), vocab_size=200)


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _preprocess(tok, out, inputs, *extra, check=True, **env):
    return run_cmd([PY, "-m", "lmforge.data_pipeline", "preprocess", "--input", *inputs, "--tokenizer", tok,
                    "--output", out, "--no-progress", "--unit-bytes", "200k", "--max-shard-bytes", "100k", *extra],
                   check=check, **env)


def _same_tree(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and ".state" not in p.parts)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and ".state" not in p.parts)
    assert [str(f) for f in files if not filecmp.cmp(a / f, b / f, shallow=False)] == []


def test_preprocess_gives_the_tokenizers_ids_for_any_workers(hf_tok, tmp_path):
    """Every document is exactly ``encode(text, add_special_tokens=False).ids`` + eos, long (cut)
    documents included, even when the tokenizer.json carries truncation and padding; workers, threads
    and processes give the same bytes."""
    book = (CORPUS / "books" / "1342-0.txt").read_text(encoding="utf-8-sig")[:60_000]
    texts = [book, "Short one.", "数学是研究数量、结构以及空间等概念的一门学科。", "  spaces  \n\ttabs 🚀"]
    tok = _tokenizers(hf_tok)
    whole = tok.encode(book, add_special_tokens=False).ids
    dropped = split_exact(book)  # SentencePiece's cut drops the space, which a byte-level BPE keeps
    assert len(book) > CHUNK_CHARS and len(dropped) > 1
    assert sum((tok.encode(p, add_special_tokens=False).ids for p in dropped), []) != whole
    kept = split_exact(book, keep_space=True)  # what preprocess does for this tokenizer
    assert len(kept) == len(dropped) and "".join(kept) == book
    assert sum((tok.encode(p, add_special_tokens=False).ids for p in kept), []) == whole

    # The same tokenizer, but its tokenizer.json truncates and pads (as some model repositories ship it).
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    tj = json.loads(hf_tok.read_text())
    tj["truncation"] = {"direction": "Right", "max_length": 16, "strategy": "LongestFirst", "stride": 0}
    tj["padding"] = {"strategy": {"Fixed": 32}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 1,
                     "pad_type_id": 0, "pad_token": "<|end_of_text|>"}
    (trunc / "tokenizer.json").write_text(json.dumps(tj))
    shutil.copy(hf_tok.parent / "tokenizer_config.json", trunc)

    data = _jsonl(tmp_path / "docs.jsonl", texts)
    _preprocess(trunc / "tokenizer.json", tmp_path / "w1", [data], "--valid-fraction", "0", "--workers", "1")
    stream = np.concatenate([np.asarray(IndexedDataset(p).tokens) for p in shard_prefixes(tmp_path / "w1")])
    want = sum((tok.encode(t, add_special_tokens=False).ids + [1] for t in texts), [])
    assert stream.tolist() == want
    m = load_manifest(tmp_path / "w1")
    assert m["tokenizer"]["file"] == "tokenizer.json" and m["dtype"] == "uint16"
    assert sorted(p.name for p in (tmp_path / "w1").iterdir() if p.is_file()) == [
        "manifest.json", "tokenizer.json", "tokenizer_config.json"]

    inputs = [data, SAMPLE / "wikipedia", CORPUS / "wikipedia" / "zhwiki"]
    _preprocess(hf_tok.parent, tmp_path / "a1", inputs, "--workers", "1")
    _preprocess(hf_tok.parent, tmp_path / "a2", inputs, "--workers", "2")
    _preprocess(hf_tok.parent, tmp_path / "a2p", inputs, "--workers", "2", LMFORGE_TOKENIZE_BACKEND="process")
    _same_tree(tmp_path / "a1", tmp_path / "a2")
    _same_tree(tmp_path / "a1", tmp_path / "a2p")
    assert len(load_manifest(tmp_path / "a1")["splits"]["train"]) > 3
    assert verify(tmp_path / "a1") == []
    report = inspect(tmp_path / "a1", samples=1)
    assert "vocab 2000" in report and "'Ġthe'" in report

    # A rerun resumes (same config); another tokenizer is refused; merge carries the tokenizer's files.
    p = _preprocess(hf_tok.parent, tmp_path / "a1", inputs, "--workers", "1")
    assert "resuming" in p.stderr
    p = _preprocess(trunc, tmp_path / "a1", inputs, check=False)
    assert p.returncode == 2 and "the tokenizer differs" in p.stderr, p.stderr
    merged = merge([str(tmp_path / "a1"), str(tmp_path / "a2")], str(tmp_path / "merged"))
    assert merged["tokenizer"]["file"] == "tokenizer.json"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (hf_tok.parent / name).read_bytes()
    assert verify(tmp_path / "merged") == []


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _variant(hf_tok: Path, out: Path, **changes) -> Path:
    """The trained tokenizer.json with other pipeline parts (its vocabulary and merges stay valid)."""
    tj = json.loads(hf_tok.read_text())
    tj.update(changes)
    out.mkdir()
    (out / "tokenizer.json").write_text(json.dumps(tj))
    return out / "tokenizer.json"


def _split_then_bytes(pattern: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def test_long_texts_are_cut_only_where_the_tokens_stay_the_same(hf_tok, tmp_path):
    """Cutting before a space (kept) gives the whole text's ids for the byte-level pre-tokenizers
    ``cuts_before_spaces`` accepts (GPT-2's, Llama 3's; Qwen2's with NFC), on every long document of the
    corpora (English and Chinese Wikipedia, books; their first 30,000 characters) with 1000-character
    pieces; the tokenizers it rejects get their texts whole."""
    from lmforge.data_pipeline.hf_tokenizer import cuts_before_spaces
    from lmforge.data_pipeline.readers import DOC, ReadOptions, expand_inputs, iter_documents

    accepted = [hf_tok, _variant(hf_tok, tmp_path / "llama3", pre_tokenizer=_split_then_bytes(LLAMA3_SPLIT)),
                _variant(hf_tok, tmp_path / "qwen2", pre_tokenizer=_split_then_bytes(QWEN2_SPLIT),
                         normalizer={"type": "NFC"})]
    inputs = [SAMPLE, CORPUS / "wikipedia" / "wikitext-2-raw", CORPUS / "wikipedia" / "zhwiki", CORPUS / "books"]
    texts = [t[:30_000] for s in expand_inputs([str(p) for p in inputs])
             for k, t, _ in iter_documents(s, ReadOptions()) if k == DOC and len(t) > 4000]
    assert len(texts) > 20
    for path in accepted:
        assert cuts_before_spaces(path), path
        tok = _tokenizers(path)
        for t in texts:
            pieces = split_exact(t, chunk=1000, keep_space=True)
            assert len(pieces) > 1 or " " not in t[1000:]
            got = sum((e.ids for e in tok.encode_batch(pieces, add_special_tokens=False)), [])
            assert got == tok.encode(t, add_special_tokens=False).ids, (path, t[:80])

    tj = json.loads(hf_tok.read_text())
    rstrip = [dict(t, rstrip=True) if t["content"] == "<|end_of_text|>" else t for t in tj["added_tokens"]]
    rejected = [
        _variant(hf_tok, tmp_path / "metaspace", pre_tokenizer={"type": "Metaspace", "replacement": "▁",
                                                                "prepend_scheme": "always", "split": True}),
        _variant(hf_tok, tmp_path / "nfkc", normalizer={"type": "NFKC"}),
        _variant(hf_tok, tmp_path / "digits", pre_tokenizer=_split_then_bytes(r"\d| ?\w+|\s+")),
        _variant(hf_tok, tmp_path / "rstrip", added_tokens=rstrip),  # "<|end_of_text|> b" eats the space
    ]
    for path in rejected:
        assert not cuts_before_spaces(path), path


def _wordlevel(path: Path, model_vocab: int, added: list[str], config: dict | None) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i + 1 for i in range(model_vocab - 1)}},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(added)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path / "tokenizer.json"


def test_eos_and_vocab_size_come_from_the_tokenizers_files(tmp_path):
    # eos as transformers writes it (an AddedToken dict) in tokenizer_config.json; unk from the model.
    f = _wordlevel(tmp_path / "a", 100, ["<s>", "</s>", "<|doc|>"],
                   {"eos_token": {"content": "<|doc|>", "__type": "AddedToken"}, "bos_token": "<s>"})
    assert {k: tokenizer_info(f)[k] for k in ("vocab_size", "eos_id", "bos_id", "unk_id", "pad_id")} == {
        "vocab_size": 103, "eos_id": 102, "bos_id": 100, "unk_id": 0, "pad_id": -1}
    # special_tokens_map.json alone; then no file at all: a known end-of-text token.
    f = _wordlevel(tmp_path / "b", 100, ["<|endoftext|>", "</s>"], None)
    assert tokenizer_info(f)["eos_id"] == 100
    (tmp_path / "b" / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert tokenizer_info(f)["eos_id"] == 101
    # None to be found, or one that is not a token: the error names the file and what to do.
    f = _wordlevel(tmp_path / "c", 100, ["<|x|>"], None)
    with pytest.raises(TokenizerError, match=r"c/tokenizer.json: cannot tell its end-of-document token.*eos_token"):
        tokenizer_info(f)
    f = _wordlevel(tmp_path / "d", 100, ["<|x|>"], {"eos_token": "<|nope|>"})
    with pytest.raises(TokenizerError, match=r"d/tokenizer_config.json: eos_token '<\|nope\|>' is not a token"):
        tokenizer_info(f)

    # The vocabulary size counts added tokens: 65,490 model ids + 20 added = 65,510 ids, past uint16's
    # 65,500 bound (Megatron's rule), so the shards must be int32 and hold the eos id 65,509.
    added = [f"<|s{i}|>" for i in range(20)]
    f = _wordlevel(tmp_path / "big", 65_490, added, {"eos_token": added[-1]})
    assert _tokenizers(f).get_vocab_size(with_added_tokens=False) == 65_490
    data = _jsonl(tmp_path / "d.jsonl", ["w1 w2 <|s3|> w65488 unknownword", "w5"])
    _preprocess(f, tmp_path / "out", [data], "--valid-fraction", "0")
    m = load_manifest(tmp_path / "out")
    assert (m["tokenizer"]["vocab_size"], m["tokenizer"]["eos_id"], m["dtype"]) == (65_510, 65_509, "int32")
    ds = IndexedDataset(shard_prefixes(tmp_path / "out")[0])
    assert ds.tokens.tolist() == [2, 3, 65_493, 65_489, 0, 65_509, 6, 65_509]


def test_a_chat_turn_eos_is_not_the_document_separator(tmp_path):
    """A chat-tuned tokenizer_config.json names its turn end as eos (Yi/Qwen chat: <|im_end|>; Llama 3
    Instruct: <|eot_id|>): the vocabulary's document token is used instead, and preprocess says so on
    stderr and in the manifest; with no document token the choice is refused naming both; --eod-token
    overrides, and a token that is not in the vocabulary is an input error (exit 2)."""
    f = _wordlevel(tmp_path / "yi", 100, ["<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   {"eos_token": "<|im_end|>", "bos_token": "<|startoftext|>"})
    info = tokenizer_info(f)
    assert (info["eos_id"], info["eod_token"]) == (101, "<|endoftext|>")
    assert "tokenizer_config.json eos_token is '<|im_end|>', a chat-turn token" in info["eod_source"]
    assert tokenizer_info(f, "<|im_end|>")["eos_id"] == 103
    for chat in ("<|eot_id|>", "<end_of_turn>", "<|end|>"):
        g = _wordlevel(tmp_path / chat.strip("<|>"), 100, ["<|end_of_text|>", chat], {"eos_token": chat})
        assert tokenizer_info(g)["eod_token"] == "<|end_of_text|>", chat
    g = _wordlevel(tmp_path / "chat_only", 100, ["<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>"})
    with pytest.raises(TokenizerError, match=r"eos_token '<\|im_end\|>' is a chat-turn token.*none of <\|endoftext\|>"
                                             r".*--eod-token"):
        tokenizer_info(g)

    data = _jsonl(tmp_path / "d.jsonl", ["w1 w2", "w3"])
    p = _preprocess(f, tmp_path / "out", [data], "--valid-fraction", "0")
    assert ("end of document: '<|endoftext|>' (id 101), from the vocabulary: tokenizer_config.json eos_token is "
            "'<|im_end|>', a chat-turn token" in p.stderr), p.stderr
    m = load_manifest(tmp_path / "out")
    assert (m["tokenizer"]["eos_id"], m["tokenizer"]["eod_token"]) == (101, "<|endoftext|>")
    assert IndexedDataset(shard_prefixes(tmp_path / "out")[0]).tokens.tolist() == [2, 3, 101, 4, 101]
    p = _preprocess(f, tmp_path / "out2", [data], "--valid-fraction", "0", "--eod-token", "<|im_end|>")
    assert "end of document: '<|im_end|>' (id 103), from --eod-token" in p.stderr
    assert load_manifest(tmp_path / "out2")["tokenizer"]["eod_source"] == "--eod-token"
    p = run_cmd([PY, "-m", "lmforge.data_pipeline", "preprocess", "--input", data, "--tokenizer", f,
                 "--output", tmp_path / "out3", "--eod-token", "<|nope|>"], check=False)
    assert p.returncode == 2 and "--eod-token '<|nope|>' is not a token of" in p.stderr, p.stderr


def test_tokenizer_paths_are_recognised_by_content(hf_tok, tmp_path):
    # A SentencePiece training output: tokenizer.model beside lmforge's own tokenizer.json record.
    sp_dir = tmp_path / "sp"
    run_cmd([PY, "-m", "lmforge.data_pipeline", "train-tokenizer", "--input", SAMPLE / "books" / "pg1952.txt",
             "--vocab-size", "400", "--threads", "1", "--output", sp_dir])
    assert resolve_tokenizer(sp_dir).kind == SENTENCEPIECE and resolve_tokenizer(sp_dir).path.name == "tokenizer.model"
    assert resolve_tokenizer(sp_dir / "tokenizer.model").kind == SENTENCEPIECE
    hf = resolve_tokenizer(hf_tok.parent)
    assert hf.kind == HF and hf.path == hf_tok and [c.name for c in hf.companions] == ["tokenizer_config.json"]
    assert resolve_tokenizer(hf_tok) == hf

    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"model": 1}')
    (tmp_path / "garbage.model").write_bytes(b"\x00\x01not a model")
    (tmp_path / "empty").mkdir()
    cases = [
        (sp_dir / "tokenizer.json", "tokenizer.json: not a tokenizer: lmforge's record of a SentencePiece training "
                                    "run, not a tokenizer; pass the tokenizer.model beside it"),
        (tmp_path / "garbage.json", "garbage.json: not a tokenizer: not valid JSON"),
        (tmp_path / "other.json", "other.json: not a tokenizer: JSON, but not a Hugging Face tokenizer.json"),
        (tmp_path / "garbage.model", "nor is it a Hugging Face tokenizer.json (not JSON)"),
        (tmp_path / "empty", "empty: a directory without a Hugging Face tokenizer.json or a SentencePiece "
                             "tokenizer.model"),
        (tmp_path / "missing.json", "missing.json: no such file or directory"),
    ]
    for path, message in cases:
        p = _preprocess(path, tmp_path / "o", [SAMPLE / "books" / "pg1952.txt"], check=False)
        assert (p.returncode, p.stderr.count("error: "), "Traceback" in p.stderr) == (2, 1, False), p.stderr
        assert message in p.stderr, p.stderr


def test_the_trainer_ends_documents_as_the_data_was_written(tmp_path):
    """The trainer's end of document is the data's recorded one (preprocess --eod-token included), so the
    batches' document boundaries are the shards'; data of another tokenizer or end of document, or two
    sources that disagree, are config errors naming the paths."""
    from lmforge.trainer.build import check_data_tokenizer, data_end_of_document, load_tokenizer
    from lmforge.trainer.config import ConfigError, load_config

    f = _wordlevel(tmp_path / "yi", 100, ["<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   {"eos_token": "<|im_end|>"})
    data = _jsonl(tmp_path / "d.jsonl", ["w1 w2", "w3"])
    _preprocess(f, tmp_path / "auto", [data], "--valid-fraction", "0")
    _preprocess(f, tmp_path / "chat", [data], "--valid-fraction", "0", "--eod-token", "<|im_end|>")

    def resolve(*sources):
        train = ", ".join(f"{{path: {s}}}" for s in sources)
        cfg = load_config(None, ["model.preset=debug", f"tokenizer={f}", f"data.train=[{train}]"])
        token, records = data_end_of_document(cfg)
        tok = load_tokenizer(cfg.tokenizer, token)
        check_data_tokenizer(tok, records)
        return tok.eod_id

    assert resolve(tmp_path / "auto") == 101
    assert resolve(tmp_path / "chat") == 103
    with pytest.raises(ConfigError, match=r"auto ends documents with '<\|endoftext\|>' \(id 101\) but .*chat with "
                                          r"'<\|im_end\|>' \(id 103\)"):
        resolve(tmp_path / "auto", tmp_path / "chat")
    other = _wordlevel(tmp_path / "other", 100, ["<|endoftext|>"], None)
    _preprocess(other, tmp_path / "other_data", [data], "--valid-fraction", "0")
    with pytest.raises(ConfigError, match=r"other_data was tokenized with another tokenizer"):
        resolve(tmp_path / "other_data")
