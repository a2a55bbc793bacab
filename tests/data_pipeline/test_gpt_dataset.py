"""PackedDataset / BlendedDataset / resolve_prefixes on real tokenized text (wikitext + Shakespeare
through a real sentencepiece model, written with the real IndexedDatasetWriter)."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from lmforge.data_pipeline.gpt_dataset import (
    BlendedDataset,
    DatasetConfigError,
    PackedDataset,
    build_dataset,
    resolve_prefixes,
)
from lmforge.data_pipeline.indexed_dataset import IndexedDatasetWriter
from lmforge.data_pipeline.manifest import FORMAT, shard_entry, write_manifest
from tests.helpers.paths import CORPUS

WIKI = CORPUS / "wikipedia" / "wikitext-2-raw" / "wiki.test.raw"
SHAKESPEARE = CORPUS / "books" / "tinyshakespeare" / "input.txt"
EOD = 2


def _paragraphs(path: Path, n_chars: int) -> list[str]:
    text = path.read_text(encoding="utf-8")[:n_chars].replace("\r\n", "\n")
    return [p.strip() for p in text.split("\n\n" if "tinyshakespeare" in str(path) else "\n") if p.strip()]


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_paragraphs(WIKI, 120_000)), model_writer=model, vocab_size=400,
        model_type="unigram", unk_id=0, bos_id=1, eos_id=EOD, pad_id=-1, minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _write(prefix: Path, docs: list[list[int]]) -> str:
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


@pytest.fixture(scope="module")
def corpus(sp, tmp_path_factory):
    """Two wiki shards and one Shakespeare shard, every document ending in EOD (as --append-eod)."""
    root = tmp_path_factory.mktemp("data")
    wiki = [sp.encode(p) + [EOD] for p in _paragraphs(WIKI, 60_000)]
    shakes = [sp.encode(p) + [EOD] for p in _paragraphs(SHAKESPEARE, 40_000)]
    half = len(wiki) // 2
    return {
        "root": root,
        "wiki_docs": wiki, "shakes_docs": shakes,
        "wiki": [_write(root / "wiki_00000", wiki[:half]), _write(root / "wiki_00001", wiki[half:])],
        "shakes": _write(root / "shakes_00000", shakes),
    }


def _stream(ds: PackedDataset, n: int) -> np.ndarray:
    """Stream positions [0, n*seq_len] rebuilt from unshuffled samples (each overlaps the next by one)."""
    parts = [ds.unshuffled(0)] + [ds.unshuffled(i)[1:] for i in range(1, n)]
    return np.concatenate(parts)


def test_epoch_holds_every_document_once_in_order(corpus):
    docs = corpus["wiki_docs"]
    total = sum(map(len, docs))
    seq_len = 64
    # Enough samples for a second epoch, so the first one is complete.
    ds = PackedDataset(corpus["wiki"], seq_len, num_samples=total // seq_len + 10, seed=1234)
    assert ds.num_epochs == 2 and ds.num_docs == len(docs) and ds.tokens_per_epoch == total
    doc_idx = np.asarray(ds._ensure()["doc_idx"])
    epochs = doc_idx.reshape(3, len(docs))  # two epochs + the one the last samples read into
    for e in range(3):
        assert sorted(epochs[e]) == list(range(len(docs)))  # each epoch: a permutation of all documents
    assert not np.array_equal(epochs[0], epochs[1])
    expected = np.concatenate([docs[d] for d in doc_idx])
    got = _stream(ds, len(ds))
    np.testing.assert_array_equal(got, expected[: len(got)])
    assert len(got) == len(ds) * seq_len + 1 > total
    # The sample shuffle stays within an epoch: samples starting in epoch 0 come first.
    first_of_epoch1 = -(-total // seq_len)
    shuffle = np.asarray(ds._ensure()["shuffle_idx"])
    assert sorted(shuffle[:first_of_epoch1]) == list(range(first_of_epoch1))


def test_samples_overlap_by_one_and_shuffle_is_a_permutation(corpus):
    ds = PackedDataset(corpus["wiki"], 32, num_samples=300, seed=7)
    held = len(ds._ensure()["sample_idx"])  # every sample starting in epoch 0 (> 300)
    plain = [ds.unshuffled(i) for i in range(held)]
    for a, b in zip(plain, plain[1:]):
        assert a[-1] == b[0]
    assert all(s.dtype == np.int64 and s.shape == (33,) for s in plain)
    # The 300 samples are distinct samples drawn from the whole epoch, not its first 300.
    shuffled = [ds[i].tobytes() for i in range(len(ds))]
    assert len(set(shuffled)) == 300 and set(shuffled) <= {s.tobytes() for s in plain}
    assert max(np.asarray(ds._ensure()["shuffle_idx"][:300])) > 300
    full = PackedDataset(corpus["wiki"], 32, num_samples=held, seed=7)
    assert sorted(full[i].tobytes() for i in range(held)) == sorted(s.tobytes() for s in plain)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_one_epoch_mode_and_determinism(corpus):
    a = PackedDataset(corpus["wiki"], 48, num_samples=0, seed=3)
    assert len(a) == (a.tokens_per_epoch - 1) // 48 and a.num_epochs == 1
    b = PackedDataset(corpus["wiki"], 48, num_samples=0, seed=3)
    c = PackedDataset(corpus["wiki"], 48, num_samples=0, seed=4)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert all(np.array_equal(a[i], b[i]) for i in range(len(a)))
    assert sum(np.array_equal(a[i], c[i]) for i in range(len(a))) < len(a) // 10


def test_cache_written_once_reloaded_identically(corpus, tmp_path):
    cache = tmp_path / "cache"
    mem = PackedDataset(corpus["wiki"], 40, 500, seed=11)  # no cache: built in memory
    ds = PackedDataset(corpus["wiki"], 40, 500, seed=11, cache_dir=str(cache))
    ds.build_cache()
    files = sorted(cache.iterdir())
    assert [f.name.split("_", 3)[-1] for f in files] == [
        "doc_idx.npy", "meta.json", "sample_idx.npy", "shuffle_idx.npy"]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    ds.build_cache()  # idempotent: nothing rewritten
    PackedDataset(corpus["wiki"], 40, 500, seed=11, cache_dir=str(cache)).build_cache()
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    again = PackedDataset(corpus["wiki"], 40, 500, seed=11, cache_dir=str(cache))
    arrays = again._ensure()
    assert all(isinstance(a, np.memmap) for a in arrays.values())  # loaded, not rebuilt
    assert arrays["doc_idx"].dtype == np.int32 and arrays["shuffle_idx"].dtype == np.int32
    assert all(np.array_equal(again[i], mem[i]) for i in range(len(mem)))
    meta = json.loads(next(f for f in files if f.name.endswith("meta.json")).read_text())
    assert meta["fingerprint"] == ds.fingerprint and meta["num_epochs"] == 1
    # A size within the same epochs reuses the cache; another seq_len / seed / epoch count is another
    # key; no stray temp files are left behind.
    same = PackedDataset(corpus["wiki"], 40, 510, seed=11, cache_dir=str(cache))
    assert same.fingerprint == ds.fingerprint and isinstance(same._ensure()["doc_idx"], np.memmap)
    for kw in ({"seq_len": 41}, {"seed": 12}, {"num_samples": 1500}):
        args = {"seq_len": 40, "num_samples": 500, "seed": 11, **kw}
        PackedDataset(corpus["wiki"], cache_dir=str(cache), **args).build_cache()
    assert len(list(cache.iterdir())) == 16 and not list(cache.glob("*.tmp*"))


def test_order_does_not_depend_on_num_samples(corpus):
    """A run extended to more steps (more epochs) resumes into the same order."""
    short = PackedDataset(corpus["wiki"], 40, 300, seed=5)
    long = PackedDataset(corpus["wiki"], 40, 5000, seed=5)
    assert short.num_epochs == 1 and long.num_epochs > 5
    assert short.order_fingerprint == long.order_fingerprint and short.fingerprint != long.fingerprint
    assert all(np.array_equal(short[i], long[i]) for i in range(len(short)))
    blend = [(corpus["wiki"][0], 0.6), (corpus["shakes"], 0.4)]
    b1 = build_dataset(blend, "train", 32, 400, seed=5, cache_dir=None)
    b2 = build_dataset(blend, "train", 32, 4000, seed=5, cache_dir=None)
    assert b1.order_fingerprint == b2.order_fingerprint and b1.fingerprint != b2.fingerprint
    assert all(np.array_equal(b1[i], b2[i]) for i in range(len(b1)))


def test_fingerprint_ignores_location(corpus, tmp_path):
    moved = []
    for p in corpus["wiki"]:
        for ext in (".idx", ".bin"):
            shutil.copy(p + ext, tmp_path / (Path(p).name + ext))
        moved.append(str(tmp_path / Path(p).name))
    a = PackedDataset(corpus["wiki"], 40, 100, seed=1)
    assert a.fingerprint == PackedDataset(moved, 40, 100, seed=1).fingerprint
    # Different data -> different key, even at the same path: rewrite one shard.
    _write(Path(moved[0]), corpus["wiki_docs"][:5])
    assert a.fingerprint != PackedDataset(moved, 40, 100, seed=1).fingerprint


def _build_in_child(prefixes, cache_dir):
    PackedDataset(prefixes, 40, 2000, seed=5, cache_dir=cache_dir).build_cache()


def test_concurrent_builders_on_one_cache_dir(corpus, tmp_path):
    # spawn, not fork: forking after torch (imported by other test modules) has started threads can hang.
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_build_in_child, args=(corpus["wiki"], str(tmp_path))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    cached = PackedDataset(corpus["wiki"], 40, 2000, seed=5, cache_dir=str(tmp_path))
    ref = PackedDataset(corpus["wiki"], 40, 2000, seed=5)
    for name, arr in cached._ensure().items():
        np.testing.assert_array_equal(arr, ref._ensure()[name])
    assert not list(tmp_path.glob("*.tmp*"))


def test_blend_proportions_and_sources(corpus, tmp_path):
    n = 3000
    ds = build_dataset([(corpus["wiki"][0], 0.7), (corpus["shakes"], 0.2), (corpus["wiki"][1], 0.1)],
                       "train", seq_len=32, num_samples=n, seed=9, cache_dir=str(tmp_path))
    assert isinstance(ds, BlendedDataset) and len(ds) == n
    idx = np.asarray(ds._ensure()["dataset_index"])
    # The greedy interleave keeps every prefix of the order within one sample of its share.
    for k, w in enumerate((0.7, 0.2, 0.1)):
        drawn = np.cumsum(idx == k)
        assert np.max(np.abs(drawn - w * np.arange(1, n + 1))) <= 1.0 + 1e-9
    # Each blended sample is the named sample of the named component.
    sample_of = np.asarray(ds._ensure()["dataset_sample_index"])
    for i in range(0, n, 97):
        np.testing.assert_array_equal(ds[i], ds.datasets[idx[i]][int(sample_of[i])])
    ds.build_cache()
    reloaded = build_dataset([(corpus["wiki"][0], 0.7), (corpus["shakes"], 0.2), (corpus["wiki"][1], 0.1)],
                             "train", seq_len=32, num_samples=n, seed=9, cache_dir=str(tmp_path))
    assert reloaded.fingerprint == ds.fingerprint
    assert isinstance(reloaded._ensure()["dataset_index"], np.memmap)
    assert all(np.array_equal(reloaded[i], ds[i]) for i in range(0, n, 13))


def test_blend_rejects_a_component_too_small(corpus):
    small = PackedDataset([corpus["shakes"]], 32, 10, seed=1)
    big = PackedDataset(corpus["wiki"], 32, 1000, seed=1)
    blend = BlendedDataset([big, small], [0.5, 0.5], 100)
    with pytest.raises(DatasetConfigError, match="draws 50"):
        blend[0]
    with pytest.raises(DatasetConfigError, match="weights"):
        BlendedDataset([big, small], [1.0, -1.0], 100)


def test_resolve_prefixes(corpus, tmp_path):
    root = corpus["root"]
    assert resolve_prefixes(corpus["shakes"], "train") == [corpus["shakes"]]
    assert resolve_prefixes(corpus["shakes"] + ".idx", "valid") == [corpus["shakes"]]
    assert resolve_prefixes(str(root / "wiki_*"), "train") == corpus["wiki"]
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "valid").mkdir()
    for src, dst in ((corpus["wiki"][0], "train/shard_00000"), (corpus["wiki"][1], "train/shard_00001"),
                     (corpus["shakes"], "valid/shard_00000")):
        for ext in (".idx", ".bin"):
            shutil.copy(src + ext, out / (dst + ext))
    splits = {"train": ["train/shard_00000", "train/shard_00001"], "valid": ["valid/shard_00000"]}
    write_manifest(out, {"format": FORMAT, "tokenizer": {"sha256": "x", "vocab_size": 400, "eos_id": EOD},
                         "splits": {s: [shard_entry(out, p) for p in ps] for s, ps in splits.items()}})
    train = resolve_prefixes(str(out), "train")
    assert train == [str(out / "train/shard_00000"), str(out / "train/shard_00001")]
    ds = build_dataset([(str(out), 1.0)], "valid", 32, 0, seed=1, cache_dir=None)
    assert isinstance(ds, PackedDataset) and ds.tokens_per_epoch == sum(map(len, corpus["shakes_docs"]))
    with pytest.raises(DatasetConfigError, match="no split 'test'; it has train, valid"):
        resolve_prefixes(str(out), "test")
    os.remove(out / "valid/shard_00000.bin")
    with pytest.raises(DatasetConfigError, match="missing"):
        resolve_prefixes(str(out), "valid")
    (out / "manifest.json").write_text("{\n  bad")
    with pytest.raises(DatasetConfigError, match="line 2"):
        resolve_prefixes(str(out), "train")
    with pytest.raises(DatasetConfigError, match="not a preprocess output directory"):
        resolve_prefixes(str(tmp_path / "nope"), "train")
    with pytest.raises(DatasetConfigError, match="glob matches no"):
        resolve_prefixes(str(tmp_path / "nope_*"), "train")
    with pytest.raises(DatasetConfigError, match="without manifest.json"):
        resolve_prefixes(str(tmp_path), "train")
    with pytest.raises(DatasetConfigError, match="fewer than one sample"):
        PackedDataset([corpus["shakes"]], 10**6, 1, seed=1)


def test_reads_a_hand_written_megatron_neox_file(tmp_path):
    """An MMIDIDX pair written byte by byte from the spec, with what Megatron/NeoX tools produce and our
    writer never does: a document of several sequences (sentence splitting), an empty document
    (repeated doc-index entry) and a zero-length sequence. Every sequence is a sample-level document."""
    seqs = [[5, 6, 7], [8, 9], [], [10, 11, 12, 13], [14, EOD], [15, 16, 17, 18, 19, EOD]]
    doc_index = [0, 2, 2, 4, 6]  # docs: {0,1}, {} (empty), {2,3}, {4,5}
    lengths = np.array([len(s) for s in seqs], dtype="<i4")
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * 4)]).astype("<i8")
    prefix = tmp_path / "neox_text_document"
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, len(seqs), len(doc_index)))  # int32 tokens
        f.write(lengths.tobytes() + pointers.tobytes() + np.array(doc_index, "<i8").tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        f.write(np.concatenate([np.array(s, "<i4") for s in seqs]).tobytes())
    ds = PackedDataset(resolve_prefixes(str(prefix), "train"), seq_len=4, num_samples=0, seed=0)
    assert ds.num_docs == 6 and ds.tokens_per_epoch == 17 and len(ds) == 4
    order = np.asarray(ds._ensure()["doc_idx"])
    expected = np.concatenate([np.array(seqs[d], dtype=np.int64) for d in order])
    np.testing.assert_array_equal(_stream(ds, len(ds)), expected[:17])
