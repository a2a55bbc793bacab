"""SentencePiece -> HF tokenizer files: exact id parity and decode round trip (real sentencepiece,
real tokenizers/transformers), for the lossless training setup and SentencePiece's default NFKC one."""

from __future__ import annotations

import json
import os

import pytest
import sentencepiece as spm

from lmforge.trainer.hf.tokenizer import PARITY_TEXTS, check_tokenizer_parity, write_tokenizer_files
from tests.helpers.checkpoints import held_out_texts, train_test_tokenizer

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module", params=["lossless", "nfkc"])
def tok_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"tok_{request.param}")
    model = train_test_tokenizer(d / "sp", lossless=request.param == "lossless")
    out = d / "hf"
    out.mkdir()
    write_tokenizer_files(model, out, model_max_length=100_000)
    return out


def test_parity_on_hard_and_held_out_text(tok_dir):
    texts = list(PARITY_TEXTS) + list(held_out_texts().values())
    assert check_tokenizer_parity(tok_dir, texts) == []


def test_parity_texts_exercise_byte_fallback(tok_dir):
    # The check is only meaningful if SentencePiece really falls back to bytes on these texts.
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    byte_ids = {sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    assert len(byte_ids) == 256 and sp.unk_id() not in byte_ids
    for text in ("🚀🔥👍🏽", "ᚠᛇᚻ ᛒᛦᚦ"):
        assert byte_ids & set(sp.encode(text)), text


def test_lossless_tokenizer_decodes_back_to_the_text(tmp_path):
    model = train_test_tokenizer(tmp_path / "sp", lossless=True)
    write_tokenizer_files(model, tmp_path, model_max_length=4096)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    for text in [t for t in PARITY_TEXTS if t.strip()] + list(held_out_texts().values()):
        ids = tok.encode(text)
        assert ids[0] == 1  # BOS prepended by default, as for Llama
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_check_fails_when_byte_fallback_is_dropped(tok_dir, tmp_path):
    # The failure mode seen elsewhere: a fast tokenizer without byte fallback emits <unk>.
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    tj = json.loads((tok_dir / "tokenizer.json").read_text())
    tj["model"]["byte_fallback"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    problems = check_tokenizer_parity(tmp_path, ["emoji 🚀 here"])
    assert problems and "ids differ" in problems[0]
