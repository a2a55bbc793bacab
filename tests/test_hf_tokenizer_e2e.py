"""Continued pretraining of a Hugging Face model with its own byte-level BPE tokenizer, end to end: a random
``transformers`` Llama saved with a tokenizer trained by ``train-tokenizer --type hf-bpe`` -> ``import_hf``
-> ``preprocess --tokenizer INIT/tokenizer.json`` -> a DeepSpeed run -> ``export_hf`` (verified) ->
``transformers`` reloads it with the same ids and our model's logits; the first step's loss is transformers'
on the imported weights. Also the vocabulary checks on the
way (a tokenizer larger than the model is refused) and the export's parity check on a broken tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from lmforge.data_pipeline.gpt_dataset import build_dataset
from lmforge.data_pipeline.indexed_dataset import IndexedDataset
from lmforge.data_pipeline.manifest import load_manifest, shard_prefixes
from lmforge.trainer.hf.tokenizer import PARITY_TEXTS
from tests.helpers.checkpoints import held_out_texts
from tests.helpers.models import perturb_norms
from tests.helpers.paths import SAMPLE
from tests.helpers.process import run_cmd
from tests.helpers.runs import deepspeed_train, hf_loss_on_packed_samples, read_metrics, write_config

os.environ["HF_HUB_OFFLINE"] = "1"
PY = sys.executable
# 4096 ids: 256 bytes, 2 specials and ~3,800 learned merges, so the ids cover multi-byte words, the
# specials sit at the bottom of the vocabulary (eos 1 is not SentencePiece's 2: a hard-coded id would show)
# and no id fits a byte. The model's vocabulary is padded to 4160 (a multiple of 64, as real models pad
# theirs): larger than the tokenizer, which every stage must accept, and the shards' dtype must follow the
# tokenizer (uint16), not the model.
TOKENIZER_VOCAB = 4096
MODEL_VOCAB = 4160
INPUTS = [SAMPLE / "wikipedia", SAMPLE / "books"]


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hftok")
    run_cmd([PY, "-m", "lmforge.data_pipeline", "train-tokenizer", "--type", "hf-bpe", "--input", *INPUTS,
             "--vocab-size", TOKENIZER_VOCAB, "--output", out])
    return out


def _random_hf_model(tok_dir, out, vocab_size=MODEL_VOCAB):
    """A random transformers Llama (GQA, untied, norms perturbed) saved with the tokenizer as transformers
    saves it (tokenizer.json + its own tokenizer_config.json)."""
    from transformers import AutoTokenizer, LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=50000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    hf = HFLlama(cfg).eval()
    perturb_norms(hf)  # norms at 1 would hide a misplaced norm
    hf.save_pretrained(out)
    tok.save_pretrained(out)
    return hf, tok


def _texts() -> list[str]:
    return [t for t in PARITY_TEXTS if t] + list(held_out_texts().values())


@pytest.mark.slow
def test_hf_model_with_byte_level_bpe_imports_trains_and_exports(tmp_path, hf_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.model import build_model
    from lmforge.trainer.checkpoint import find_checkpoint, read_state, weight_source
    from lmforge.trainer.hf.verify import LOGIT_ATOL

    hf_dir, init, data, run, export = (tmp_path / n for n in ("hf", "init", "data", "run", "export"))
    original, tok = _random_hf_model(hf_tokenizer_dir, hf_dir)
    assert len(tok) == TOKENIZER_VOCAB and tok.eos_token_id == 1

    run_cmd([PY, "-m", "lmforge.trainer.import_hf", "--model", hf_dir, "--output", init])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (init / name).read_bytes() == (hf_dir / name).read_bytes(), name

    run_cmd([PY, "-m", "lmforge.data_pipeline", "preprocess", "--input", *INPUTS, "--tokenizer",
             init / "tokenizer.json", "--output", data, "--valid-fraction", "0.05", "--strip-gutenberg",
             "--no-progress", "--workers", "2"])
    m = load_manifest(data)
    assert m["tokenizer"]["file"] == "tokenizer.json" and m["dtype"] == "uint16"
    assert (m["tokenizer"]["vocab_size"], m["tokenizer"]["eos_id"], m["tokenizer"]["bos_id"]) == (TOKENIZER_VOCAB, 1, 0)
    assert (data / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    ds = IndexedDataset(shard_prefixes(data)[0])
    doc = ds[0].tolist()
    # A document is the tokenizer's own ids (no BOS added) closed by its eos: byte-level BPE decodes
    # losslessly, so re-encoding the decoded text must give the same ids back.
    assert doc[-1] == tok.eos_token_id and tok.bos_token_id not in doc[:-1]
    assert tok.encode(tok.decode(doc[:-1]), add_special_tokens=False) == doc[:-1]

    cfg = write_config(tmp_path / "cfg.yaml", {"tokenizer": init, "data": data}, run,
                       model={"init_from_hf": str(init)},
                       train={"max_steps": 3, "micro_batch_size": 2, "seed": 7, "precision": "fp32"},
                       optim={"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1}, checkpoint={"interval": 3})
    deepspeed_train(cfg, ["model.preset=null"], nproc=1)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # Continued pretraining starts from the imported weights: the first step's loss, computed before any
    # update, equals transformers' on the same two samples (fp32 on both sides, summation order only:
    # ~1e-7 relative on a loss of ~8; another init is O(1) off).
    train = build_dataset([(str(data), 1.0)], "train", 64, 2, 7, cache_dir=None)
    want, _ = hf_loss_on_packed_samples(original, [train[0], train[1]], eod_id=tok.eos_token_id)
    assert abs(rows[0]["loss"] - want) < 1e-5, (rows[0]["loss"], want)
    ckdir = run / "checkpoints"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (ckdir / name).read_bytes() == (hf_dir / name).read_bytes(), name
    tag = find_checkpoint(ckdir)
    state = read_state(tag)
    assert (state.tokenizer.file, state.tokenizer.vocab_size, state.tokenizer.eos_id) == ("tokenizer.json",
                                                                                         TOKENIZER_VOCAB, 1)
    assert state.model.vocab_size == MODEL_VOCAB

    texts = _texts()
    verify_file = tmp_path / "held_out.txt"
    verify_file.write_text("\n".join(texts), encoding="utf-8")
    p = run_cmd([PY, "-m", "lmforge.trainer.export_hf", "--checkpoint", ckdir, "--output", export,
                 "--verify-text-file", verify_file])  # verified: weights, logits, HF tokenizer parity, generate
    assert (export / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert not (export / "tokenizer.model").exists()
    # transformers saved the tokenizer_config.json with its own class name and an unbounded length: the
    # export names the class every transformers version loads tokenizer.json with, and says so.
    config = json.loads((export / "tokenizer_config.json").read_text())
    assert (config["tokenizer_class"], config["eos_token"], config["model_max_length"]) == (
        "PreTrainedTokenizerFast", "<|end_of_text|>", 128)
    assert "tokenizer: tokenizer_config.json: tokenizer_class TokenizersBackend -> PreTrainedTokenizerFast" in p.stderr
    assert "tokenizer_class TokenizersBackend -> PreTrainedTokenizerFast" in (export / "README.md").read_text()

    reloaded_tok = AutoTokenizer.from_pretrained(str(export), local_files_only=True)
    for text in texts:
        assert reloaded_tok.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
        assert reloaded_tok.encode(text) == tok.encode(text)  # with the tokenizer's own BOS, as before
    reloaded = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32, local_files_only=True).eval()
    assert (reloaded.config.vocab_size, reloaded.config.eos_token_id, reloaded.config.bos_token_id) == (
        MODEL_VOCAB, 1, 0)

    # Our model on the checkpoint's own weights (not the export's files) against transformers on the export.
    getters, _ = weight_source(tag, state)
    ours = build_model(state.model).eval()
    ours.load_state_dict({k: get().float() for k, get in getters.items()})
    ids = torch.tensor([tok.encode(texts[-2], add_special_tokens=False)[:100]])
    with torch.no_grad():
        logits = reloaded(input_ids=ids).logits
        diff = (ours(ids) - logits).abs().max().item()
        moved = (original(input_ids=ids).logits - logits).abs().max().item()
    assert diff <= LOGIT_ATOL, diff  # fp32 on both sides: summation order only (see LOGIT_ATOL)
    assert moved > 1e-3, moved  # and it is the trained model, not the imported one

    # The export keeps the end of document the run trained with (the checkpoint's record), whatever the
    # tokenizer_config.json beside the checkpoint came to name, and says what it changed.
    config = json.loads((ckdir / "tokenizer_config.json").read_text())
    (ckdir / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|begin_of_text|>"}))
    p = run_cmd([PY, "-m", "lmforge.trainer.export_hf", "--checkpoint", ckdir, "--output", tmp_path / "eos"])
    assert "eos_token '<|begin_of_text|>' -> '<|end_of_text|>' (the end of document the run trained with, id 1" \
        in p.stderr, p.stderr[-2000:]
    assert json.loads((tmp_path / "eos" / "tokenizer_config.json").read_text())["eos_token"] == "<|end_of_text|>"


def test_tokenizer_larger_than_the_model_is_refused(tmp_path, hf_tokenizer_dir):
    from lmforge.trainer.build import load_tokenizer, resolve_model
    from lmforge.trainer.config import ConfigError, RunConfig
    from lmforge.trainer.hf.importer import HFImportError, import_hf, load_hf_weights

    hf_dir = tmp_path / "hf"
    _random_hf_model(hf_tokenizer_dir, hf_dir, vocab_size=TOKENIZER_VOCAB - 64)
    with pytest.raises(HFImportError, match=f"tokenizer.json: {TOKENIZER_VOCAB} token ids, more than the model's "
                                            f"vocab_size {TOKENIZER_VOCAB - 64}"):
        import_hf(hf_dir, tmp_path / "init", verify=False)
    tok = load_tokenizer(str(hf_dir / "tokenizer.json"))
    assert (tok.vocab_size, tok.eod_id, tok.record().file) == (TOKENIZER_VOCAB, 1, "tokenizer.json")
    cfg = RunConfig(tokenizer=str(hf_dir))
    cfg.model.preset, cfg.model.init_from_hf = None, str(hf_dir)
    with pytest.raises(ConfigError, match=f"vocab {TOKENIZER_VOCAB - 64} < tokenizer vocab {TOKENIZER_VOCAB}"):
        resolve_model(cfg, tok.vocab_size, load_hf_weights(hf_dir))


def test_export_parity_check_catches_a_changed_hf_tokenizer(tmp_path, hf_tokenizer_dir):
    """The export's HF tokenizer files pass the parity check against the run's tokenizer.json, and a
    tokenizer.json that encodes differently (a prefix space added, as some converters do) fails it."""
    from lmforge.trainer.hf.tokenizer import check_hf_tokenizer_parity, write_hf_tokenizer_files

    out = tmp_path / "export"
    out.mkdir()
    write_hf_tokenizer_files(hf_tokenizer_dir / "tokenizer.json", out, model_max_length=128)
    assert check_hf_tokenizer_parity(out, hf_tokenizer_dir / "tokenizer.json", _texts()) == []
    tj = json.loads((out / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["add_prefix_space"] = True
    (out / "tokenizer.json").write_text(json.dumps(tj))
    problems = check_hf_tokenizer_parity(out, hf_tokenizer_dir / "tokenizer.json", ["The quick brown fox"])
    assert problems and "ids differ from the run's tokenizer.json" in problems[0]

    # A bare tokenizer.json (no tokenizer_config.json): export writes one naming the eos it was trained with.
    bare, out2 = tmp_path / "bare", tmp_path / "export2"
    bare.mkdir()
    out2.mkdir()
    shutil.copy(hf_tokenizer_dir / "tokenizer.json", bare / "tokenizer.json")
    write_hf_tokenizer_files(bare / "tokenizer.json", out2, model_max_length=128)
    config = json.loads((out2 / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|end_of_text|>" and config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert check_hf_tokenizer_parity(out2, bare / "tokenizer.json", _texts()) == []
