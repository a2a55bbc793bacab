"""Megatron compatibility checked against Megatron's own code (megatron-core, CPU import):

(a) our ``preprocess`` output is byte-identical to what Megatron-LM's tools/preprocess_data.py writes
    with ``--tokenizer-type GPTSentencePieceTokenizer --append-eod`` for the same .jsonl;
(b) Megatron's ``IndexedDataset`` reads our multi-shard, multi-sequence-document output exactly;
(c) our ``IndexedDataset`` and the trainer's ``PackedDataset`` read Megatron-written files exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from lmforge.data_pipeline.gpt_dataset import PackedDataset
from lmforge.data_pipeline.indexed_dataset import IndexedDataset
from lmforge.data_pipeline.manifest import load_manifest, shard_prefixes
from tests.helpers.paths import CORPUS, SAMPLE
from tests.helpers.process import run_cmd

PY = sys.executable

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": irrelevant on CPU
    warnings.simplefilter("ignore")
    from megatron.core.datasets import indexed_dataset as mcore_idx
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    run_cmd([PY, "-m", "lmforge.data_pipeline", "train-tokenizer", "--input", SAMPLE / "books/pg1952.txt",
             CORPUS / "wikipedia/Wikipedia_Json2conll", CORPUS / "wikipedia/zhwiki", "--vocab-size", "2000",
             "--character-coverage", "0.98", "--output", out, "--threads", "1"])
    return out / "tokenizer.model"


def megatron_tokenizer(model: Path):
    """What tools/preprocess_data.py builds for ``--tokenizer-type GPTSentencePieceTokenizer
    --tokenizer-model MODEL`` (megatron-core maps that type to its SentencePiece library tokenizer)."""
    args = argparse.Namespace(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=str(model),
                              tokenizer_sentencepiece_legacy=False, tokenizer_special_tokens=None,
                              tokenizer_metadata=None)
    return build_tokenizer(args)


def megatron_preprocess(jsonl: Path, model: Path, prefix: Path, split_lines: bool = False) -> None:
    """Megatron-LM tools/preprocess_data.py, Partition.process_json_file + Encoder.encode, in process:
    per json line tokenize the text field, append eod to a non-empty document, add_document(ids, lens);
    an empty document is added with no sequences. ``split_lines`` stands in for --split-sentences (one
    sequence per line of the text) to produce multi-sequence documents."""
    tokenizer = megatron_tokenizer(model)
    builder = mcore_idx.IndexedDatasetBuilder(
        f"{prefix}.bin", dtype=mcore_idx.DType.optimal_dtype(tokenizer.vocab_size))
    with open(jsonl, encoding="utf-8") as fin:
        for line in fin:
            text = json.loads(line)["text"]
            sentences = text.split("\n") if split_lines else [text]
            doc_ids, lens = [], []
            for sentence in sentences:
                ids = tokenizer.tokenize(sentence)
                if len(ids) > 0:
                    doc_ids.extend(ids)
                    lens.append(len(ids))
            if len(doc_ids) > 0:
                doc_ids.append(tokenizer.eod)
                lens[-1] += 1
            builder.add_document(doc_ids, lens)
    builder.finalize(f"{prefix}.idx")


def write_jsonl(path: Path) -> None:
    """Real Wikipedia JSON lines, an empty document, a whitespace-only one and a whole book on one line
    (long enough for the pipeline's exact chunked tokenization)."""
    lines = (CORPUS / "wikipedia/Wikipedia_Json2conll/AA/wiki_00").read_text(encoding="utf-8").splitlines()
    lines.insert(3, json.dumps({"text": ""}))
    lines.insert(7, json.dumps({"text": "  \n "}))
    book = (SAMPLE / "books/pg1952.txt").read_text(encoding="utf-8-sig")
    lines.insert(9, json.dumps({"text": book}))
    zh_text = (CORPUS / "wikipedia/zhwiki/AA/wiki_00").read_text(encoding="utf-8")[:20000]
    lines.append(json.dumps({"text": zh_text}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_preprocess_bytes_equal_megatron_preprocess_data(tok, tmp_path):
    jsonl = tmp_path / "in.jsonl"
    write_jsonl(jsonl)
    megatron_preprocess(jsonl, tok, tmp_path / "megatron_text_document")
    run_cmd([PY, "-m", "lmforge.data_pipeline", "preprocess", "--input", jsonl, "--tokenizer", tok, "--output",
             tmp_path / "ours", "--no-progress", "--workers", "2", "--keep-empty", "--valid-fraction", "0"])
    (prefix,) = shard_prefixes(tmp_path / "ours", "train")
    assert shard_prefixes(tmp_path / "ours", "valid") == []
    for ext in (".bin", ".idx"):
        ours = Path(prefix + ext).read_bytes()
        assert ours == (tmp_path / f"megatron_text_document{ext}").read_bytes(), ext
    ds = IndexedDataset(prefix)
    assert ds.num_documents == len(jsonl.read_text().splitlines()) and ds.num_tokens > 50_000


def test_megatron_reads_our_shards(tok, tmp_path):
    """Several units and shards, books streamed in pieces (documents of several sequences)."""
    inputs = [SAMPLE / "books/pg1952.txt", SAMPLE / "books/11-0.txt", SAMPLE / "wikipedia"]
    run_cmd([PY, "-m", "lmforge.data_pipeline", "preprocess", "--input", *inputs, "--tokenizer", tok, "--output",
             tmp_path / "ours", "--no-progress", "--workers", "2", "--max-doc-bytes", "40k",
             "--max-shard-bytes", "200k", "--unit-bytes", "100k", "--valid-fraction", "0.1"])
    m = load_manifest(tmp_path / "ours")
    multi_seq_docs = 0
    shards = 0
    for split in ("train", "valid"):
        for prefix in shard_prefixes(tmp_path / "ours", split):
            ours = IndexedDataset(prefix)
            theirs = mcore_idx.IndexedDataset(prefix, mmap=True)
            assert len(theirs) == len(ours) and np.dtype(theirs.index.dtype) == ours.dtype
            assert np.array_equal(theirs.sequence_lengths, ours.sequence_lengths)
            assert np.array_equal(theirs.index.sequence_pointers, ours.sequence_pointers)
            assert np.array_equal(theirs.document_indices, ours.document_indices)
            for i in range(len(ours)):
                assert np.array_equal(theirs[i], ours[i])
            if len(ours):
                mid = int(ours.sequence_lengths[0]) // 2
                assert np.array_equal(theirs.get(0, offset=mid, length=3), ours.get(0, mid, 3))
            multi_seq_docs += int((np.diff(ours.document_indices) > 1).sum())
            shards += 1
    assert shards == m["totals"]["train"]["shards"] + m["totals"]["valid"]["shards"] and shards >= 4
    assert multi_seq_docs >= 2  # the two books


def test_we_read_megatron_written_files(tok, tmp_path):
    jsonl = tmp_path / "in.jsonl"
    write_jsonl(jsonl)
    megatron_preprocess(jsonl, tok, tmp_path / "mega", split_lines=True)
    theirs = mcore_idx.IndexedDataset(str(tmp_path / "mega"))
    ours = IndexedDataset(tmp_path / "mega")
    assert len(ours) == len(theirs) and (np.diff(ours.document_indices) > 1).any()
    assert np.array_equal(ours.document_indices, theirs.document_indices)
    for i in range(len(ours)):
        assert np.array_equal(ours[i], theirs[i])
    # The trainer's dataset: every sequence is a document; one epoch of packed samples, each the
    # seq_len+1 window of the shuffled document stream.
    seq_len = 64
    pd = PackedDataset([str(tmp_path / "mega")], seq_len=seq_len, num_samples=0, seed=3)
    order = pd._ensure()["doc_idx"][: len(theirs)]
    assert sorted(order.tolist()) == list(range(len(theirs)))
    stream = np.concatenate([theirs[int(d)] for d in order]).astype(np.int64)
    assert len(pd) == (len(stream) - 1) // seq_len
    for i in range(len(pd)):
        assert np.array_equal(pd.unshuffled(i), stream[i * seq_len : i * seq_len + seq_len + 1])
