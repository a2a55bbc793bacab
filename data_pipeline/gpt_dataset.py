"""Training samples from Megatron indexed datasets: packing, seeded global order, blending, caching.

Semantics follow Megatron-LM's ``GPTDataset`` / ``BlendedDataset`` (see
``docs/indexed_dataset_format.md``): every sequence of every prefix is a document; documents
are shuffled per epoch with a seeded ``numpy.random.RandomState``; the shuffled token stream is cut into
samples of ``seq_len + 1`` tokens packed across document boundaries (sample i covers stream positions
``[i*seq_len, i*seq_len + seq_len]``, so consecutive samples share one token: the last label of one is
the first input of the next); finally the sample order is shuffled. Epochs are added until
``num_samples`` samples exist.

Unlike Megatron (one shuffle over all epochs' documents, one over all samples, both depending on the
total sample count), each epoch is shuffled on its own from ``RandomState([seed, epoch])``: the samples
starting in epoch e are permuted among themselves. So every document appears once per epoch, and the
order of samples [0, n) does not depend on ``num_samples``: a run extended to more steps resumes at its
``consumed_samples`` into the very same order (``order_fingerprint`` identifies that order).

Nothing is ever materialised per token. Three index arrays describe the order:

    doc_idx     ((epochs+1) * docs,) document id at each stream position   int32 (int64 if needed)
    sample_idx  (held, 2)            (doc_idx position, token offset) where sample i starts
    shuffle_idx (held,)              sample order                          int32 (int64 if needed)

``held`` = all samples starting in the first ``num_epochs`` epochs (>= num_samples; the last ones
read into one further epoch, hence epochs+1). They are cached as ``.npy`` files named by
``fingerprint``, a hash of everything that determines them (the ``.idx`` contents of each prefix,
seq_len, seed, epoch count, format version) and nothing else (not paths or mtimes), so the same data
copied elsewhere reuses the cache. Resume needs only the number of consumed samples: the order is
global and independent of the data-parallel size.

numpy only: this module is imported by data tools that must not need torch.
"""

from __future__ import annotations

import glob
import math
import os
from functools import cached_property

import numpy as np
from tqdm import tqdm

from lmforge.common.errors import InputError
from lmforge.common.files import atomic_open, atomic_write_json, sha256_file_cached, sha256_json

from .indexed_dataset import IndexedDataset, exists
from .manifest import MANIFEST_NAME, ManifestError, shard_prefixes

# Bump when the construction of the index arrays changes, so stale caches are never reused.
INDEX_FORMAT_VERSION = 1
# Searchsorted in chunks so building for hundreds of millions of samples stays within a few 100 MB.
_CHUNK = 1 << 22
# Show a progress bar for blends big enough to take a few seconds (~0.6 s per million samples).
_BLEND_PROGRESS_FROM = 5_000_000


class DatasetConfigError(InputError):
    """A data path, split or size that cannot be used, with the reason."""


# --------------------------------------------------------------------------------------------------
# Locating data


def _manifest_prefixes(directory: str, split: str) -> list[str]:
    """The shards of ``split`` listed in ``directory``'s manifest: all present, at least one."""
    try:
        prefixes = shard_prefixes(directory, split)
    except ManifestError as e:  # one error type for whatever the data path names
        raise DatasetConfigError(str(e)) from None
    if not prefixes:
        raise DatasetConfigError(f"{os.path.join(directory, MANIFEST_NAME)}: split {split!r} has no shards")
    return prefixes


def resolve_prefixes(path: str, split: str) -> list[str]:
    """Dataset prefixes named by ``path``, for ``split``.

    ``path`` is one of:
      * a preprocess output directory (has ``manifest.json``): that split's shard prefixes, absolute;
      * a Megatron prefix (``path.idx`` and ``path.bin`` exist; a trailing ``.idx``/``.bin`` is
        tolerated): ``[path]``. ``split`` is not applied -- name a separate prefix for validation;
      * a glob of prefixes, e.g. ``data/shard_*`` (matched against ``*.idx``): sorted matches.
    """
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, MANIFEST_NAME)):
            return _manifest_prefixes(path, split)
        hint = " (it holds .idx files: pass a glob such as DIR/*)" if glob.glob(f"{path}/*.idx") else ""
        raise DatasetConfigError(f"{path}: directory without manifest.json{hint}")
    for suffix in (".idx", ".bin"):
        if path.endswith(suffix) and exists(path[: -len(suffix)]):
            path = path[: -len(suffix)]
    if exists(path):
        return [os.path.abspath(path)]
    if glob.has_magic(path):
        pattern = path if path.endswith(".idx") else f"{path}.idx"
        prefixes = sorted(os.path.abspath(p[: -len(".idx")]) for p in glob.glob(pattern))
        prefixes = [p for p in prefixes if exists(p)]
        if prefixes:
            return prefixes
        raise DatasetConfigError(f"{path}: glob matches no .idx/.bin pair")
    if os.path.exists(f"{path}.idx") or os.path.exists(f"{path}.bin"):
        raise DatasetConfigError(f"{path}: only one of {path}.idx / {path}.bin exists")
    raise DatasetConfigError(
        f"{path}: not a preprocess output directory (manifest.json), a Megatron prefix "
        "(PREFIX.idx + PREFIX.bin) or a glob of prefixes"
    )


# --------------------------------------------------------------------------------------------------
# Helpers


def _index_dtype(max_value: int) -> np.dtype:
    return np.dtype(np.int32) if max_value < np.iinfo(np.int32).max else np.dtype(np.int64)


def _save_atomic(path: str, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


class _IndexCache:
    """Named ``.npy`` arrays plus a ``.json`` marker written last: arrays are used only when the marker
    exists, so a reader never sees a half-written set even if a builder died midway."""

    def __init__(self, cache_dir: str | None, stem: str, names: tuple[str, ...]):
        self.cache_dir, self.stem, self.names = cache_dir, stem, names

    def _path(self, name: str) -> str:
        return os.path.join(self.cache_dir, f"{self.stem}_{name}")

    def complete(self) -> bool:
        if self.cache_dir is None:
            return False
        files = [self._path("meta.json")] + [self._path(f"{n}.npy") for n in self.names]
        return all(os.path.exists(p) for p in files)

    def load(self) -> dict[str, np.ndarray]:
        return {n: np.load(self._path(f"{n}.npy"), mmap_mode="r", allow_pickle=False) for n in self.names}

    def save(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        assert self.cache_dir is not None
        os.makedirs(self.cache_dir, exist_ok=True)
        for n in self.names:
            _save_atomic(self._path(f"{n}.npy"), arrays[n])
        atomic_write_json(self._path("meta.json"), meta, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# Packed dataset


class PackedDataset:
    """Megatron-GPTDataset-like samples of ``seq_len + 1`` tokens from the documents of ``prefixes``.

    ``num_samples <= 0`` means one epoch: every complete sample of a single pass (for validation).
    Index arrays come from ``cache_dir`` when cached there; otherwise they are built in memory on first
    access (so constructing is cheap on every rank; call ``build_cache()`` on one process per node
    first when several processes share a node).
    """

    def __init__(self, prefixes: list[str], seq_len: int, num_samples: int, seed: int,
                 cache_dir: str | None = None, name: str = "train"):
        if not prefixes:
            raise DatasetConfigError(f"{name}: no dataset prefixes given")
        if seq_len < 1:
            raise DatasetConfigError(f"{name}: seq_len must be >= 1, got {seq_len}")
        self.prefixes = [str(p) for p in prefixes]
        self.seq_len, self.seed, self.name = int(seq_len), int(seed), name
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.datasets = [IndexedDataset(p) for p in self.prefixes]
        # Global document id d lives in dataset k = searchsorted(doc_offsets, d, 'right') - 1.
        counts = [len(ds) for ds in self.datasets]
        self.doc_offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.num_docs = int(self.doc_offsets[-1])
        self.tokens_per_epoch = int(sum(int(ds.num_tokens) for ds in self.datasets))
        if self.tokens_per_epoch < self.seq_len + 1:
            raise DatasetConfigError(
                f"{name}: {self.prefixes[0]}{' ...' if len(prefixes) > 1 else ''} holds "
                f"{self.tokens_per_epoch} tokens, fewer than one sample of seq_len+1={self.seq_len + 1}"
            )
        if num_samples <= 0:  # samples lying wholly inside epoch 0
            num_samples = (self.tokens_per_epoch - 1) // self.seq_len
        self.num_samples = int(num_samples)
        # Samples starting in epochs [0, e) number ceil(e*E/T); the fewest epochs holding num_samples:
        self.num_epochs = (self.num_samples - 1) * self.seq_len // self.tokens_per_epoch + 1
        self._arrays: dict[str, np.ndarray] | None = None

    def _epoch_first_sample(self, e: int) -> int:
        """Index of the first sample starting in epoch e (= samples starting before it)."""
        return -(-e * self.tokens_per_epoch // self.seq_len)

    @cached_property
    def order_fingerprint(self) -> str:
        """Identifies the sample order; it holds for any num_samples (the arrays' length does not)."""
        ident = {
            "kind": "packed", "version": INDEX_FORMAT_VERSION, "seq_len": self.seq_len, "seed": self.seed,
            # The .idx holds lengths, pointers, document index and dtype: all the arrays depend on.
            "idx_sha256": [sha256_file_cached(f"{p}.idx") for p in self.prefixes],
        }
        return sha256_json(ident)

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the cached arrays: the order plus how many epochs of it they hold."""
        ident = {"order": self.order_fingerprint, "num_epochs": self.num_epochs}
        return sha256_json(ident)

    @cached_property
    def _cache(self) -> _IndexCache:
        stem = f"{self.name}_packed_{self.fingerprint[:20]}"
        return _IndexCache(self.cache_dir, stem, ("doc_idx", "sample_idx", "shuffle_idx"))

    def __len__(self) -> int:
        return self.num_samples

    # -- building --------------------------------------------------------------------------------

    def _sequence_lengths(self) -> np.ndarray:
        if len(self.datasets) == 1:
            return self.datasets[0].sequence_lengths
        return np.concatenate([ds.sequence_lengths for ds in self.datasets])

    def _build_arrays(self) -> dict[str, np.ndarray]:
        held = self._epoch_first_sample(self.num_epochs)
        # Epoch e's RNG draws its document permutation, then its sample permutation: both depend on
        # (seed, e) only, which is what keeps the order independent of num_samples.
        rngs = [np.random.RandomState([self.seed, e]) for e in range(self.num_epochs + 1)]
        doc_idx = np.empty((self.num_epochs + 1) * self.num_docs, dtype=_index_dtype(self.num_docs))
        for e, rng in enumerate(rngs):
            doc_idx[e * self.num_docs : (e + 1) * self.num_docs] = rng.permutation(self.num_docs)
        # ends[j] = stream position just past document doc_idx[j]: O(documents), not O(tokens).
        lengths = self._sequence_lengths()
        ends = np.cumsum(lengths[doc_idx], dtype=np.int64)
        sample_idx = np.empty((held, 2), dtype=_index_dtype(max(len(doc_idx), int(lengths.max(initial=0)))))
        for lo in range(0, held, _CHUNK):
            starts = np.arange(lo, min(lo + _CHUNK, held), dtype=np.int64) * self.seq_len
            # side='right' skips zero-length documents: the first j with ends[j] > start.
            j = np.searchsorted(ends, starts, side="right")
            sample_idx[lo : lo + len(j), 0] = j
            sample_idx[lo : lo + len(j), 1] = starts - (ends[j] - lengths[doc_idx[j]])
        shuffle_idx = np.empty(held, dtype=_index_dtype(held))
        for e in range(self.num_epochs):
            lo, hi = self._epoch_first_sample(e), self._epoch_first_sample(e + 1)
            shuffle_idx[lo:hi] = lo + rngs[e].permutation(hi - lo)
        return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}

    def _meta(self) -> dict:
        return {
            "fingerprint": self.fingerprint, "order_fingerprint": self.order_fingerprint, "kind": "packed",
            "name": self.name, "seq_len": self.seq_len, "seed": self.seed, "num_epochs": self.num_epochs,
            "num_docs": self.num_docs, "tokens_per_epoch": self.tokens_per_epoch, "prefixes": self.prefixes,
        }

    def build_cache(self) -> None:
        """Build the index arrays and write them atomically into ``cache_dir`` (no-op if cached).

        Safe to race: concurrent builders write identical bytes and each file appears by ``os.replace``.
        """
        if self.cache_dir is None:
            raise DatasetConfigError(f"{self.name}: build_cache() needs a cache_dir")
        if not self._cache.complete():
            self._cache.save(self._arrays or self._build_arrays(), self._meta())
        self._arrays = None  # re-open from the cache (memory-mapped) on next access

    def _ensure(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = self._cache.load() if self._cache.complete() else self._build_arrays()
        return self._arrays

    # -- reading ---------------------------------------------------------------------------------

    def _read(self, j: int, offset: int) -> np.ndarray:
        """seq_len+1 tokens of the stream starting at document position j, token ``offset``."""
        doc_idx = self._ensure()["doc_idx"]
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        filled = 0
        while filled < len(out):
            doc = int(doc_idx[j])
            k = int(np.searchsorted(self.doc_offsets, doc, side="right")) - 1
            chunk = self.datasets[k].get(doc - int(self.doc_offsets[k]), offset, None)
            n = min(len(chunk), len(out) - filled)
            out[filled : filled + n] = chunk[:n]
            filled += n
            j, offset = j + 1, 0
        return out

    def unshuffled(self, i: int) -> np.ndarray:
        """Sample i in stream order (before the sample shuffle): for inspection and tests."""
        j, offset = self._ensure()["sample_idx"][i]
        return self._read(int(j), int(offset))

    def __getitem__(self, idx: int) -> np.ndarray:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"{self.name}: sample {idx} out of range [0, {self.num_samples})")
        return self.unshuffled(int(self._ensure()["shuffle_idx"][idx]))


# --------------------------------------------------------------------------------------------------
# Blending


def _blend_indices(weights: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy interleave: sample i goes to the dataset lagging its share the most,
    ``argmax_k(w_k * max(i, 1) - drawn_k)`` with ties to the lowest k. Keeps every dataset's count
    within one sample of ``w_k * i``. A plain loop over K small lists: ~1 s per million samples,
    done once per cache."""
    k_count = len(weights)
    w = [float(x) for x in weights]
    drawn = [0] * k_count
    dataset_index = np.empty(num_samples, dtype=np.int16 if k_count < 2**15 else np.int32)
    dataset_sample = np.empty(num_samples, dtype=_index_dtype(num_samples))
    bar = tqdm(total=num_samples, desc="blend index", unit="sample", unit_scale=True,
               disable=num_samples < _BLEND_PROGRESS_FROM, mininterval=1.0)
    for i in range(num_samples):
        if i & 0xFFFF == 0 and i:
            bar.update(0x10000)
        t = float(max(i, 1))
        best, best_err = 0, w[0] * t - drawn[0]
        for k in range(1, k_count):
            err = w[k] * t - drawn[k]
            if err > best_err:
                best, best_err = k, err
        dataset_index[i] = best
        dataset_sample[i] = drawn[best]
        drawn[best] += 1
    bar.update(num_samples - bar.n)
    bar.close()
    return dataset_index, dataset_sample


class BlendedDataset:
    """Deterministic weighted interleave of several datasets (Megatron's ``BlendedDataset``)."""

    def __init__(self, datasets: list[PackedDataset], weights: list[float], num_samples: int,
                 cache_dir: str | None = None):
        if not datasets or len(datasets) != len(weights):
            raise DatasetConfigError(f"blend: {len(datasets)} datasets but {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise DatasetConfigError(f"blend: weights must be finite and > 0, got {list(weights)}")
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        self.num_samples = int(num_samples)
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.name = datasets[0].name
        self._arrays: dict[str, np.ndarray] | None = None

    @cached_property
    def order_fingerprint(self) -> str:
        """The greedy interleave of sample i does not depend on num_samples, nor do the components'
        orders: this identifies the blended order for any length."""
        ident = {"kind": "blended", "version": INDEX_FORMAT_VERSION, "weights": [float(x) for x in self.weights],
                 "children": [d.order_fingerprint for d in self.datasets]}
        return sha256_json(ident)

    @cached_property
    def fingerprint(self) -> str:
        ident = {"order": self.order_fingerprint, "num_samples": self.num_samples,
                 "children": [d.fingerprint for d in self.datasets]}
        return sha256_json(ident)

    @cached_property
    def _cache(self) -> _IndexCache:
        stem = f"{self.name}_blended_{self.fingerprint[:20]}"
        return _IndexCache(self.cache_dir, stem, ("dataset_index", "dataset_sample_index"))

    def __len__(self) -> int:
        return self.num_samples

    def _build_arrays(self) -> dict[str, np.ndarray]:
        dataset_index, dataset_sample = _blend_indices(self.weights, self.num_samples)
        for k, ds in enumerate(self.datasets):
            need = int(np.count_nonzero(dataset_index == k))
            if need > len(ds):
                raise DatasetConfigError(
                    f"blend: dataset {k} ({ds.prefixes[0]}) has {len(ds)} samples, the blend of "
                    f"{self.num_samples} at weight {self.weights[k]:.4f} draws {need}"
                )
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample}

    def build_cache(self) -> None:
        """Build children's caches, then the blend's; atomic and idempotent like PackedDataset's."""
        if self.cache_dir is None:
            raise DatasetConfigError("blend: build_cache() needs a cache_dir")
        for ds in self.datasets:
            ds.build_cache()
        if not self._cache.complete():
            meta = {"fingerprint": self.fingerprint, "kind": "blended", "num_samples": self.num_samples,
                    "weights": [float(x) for x in self.weights],
                    "children": [d.fingerprint for d in self.datasets]}
            self._cache.save(self._arrays or self._build_arrays(), meta)
        self._arrays = None

    def _ensure(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = self._cache.load() if self._cache.complete() else self._build_arrays()
        return self._arrays

    def __getitem__(self, idx: int) -> np.ndarray:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"blend: sample {idx} out of range [0, {self.num_samples})")
        arrays = self._ensure()
        return self.datasets[int(arrays["dataset_index"][idx])][int(arrays["dataset_sample_index"][idx])]


# --------------------------------------------------------------------------------------------------
# Entry point for the trainer


# Megatron sizes each blended component 0.5% larger than its share; the greedy interleave needs at
# most one extra sample, the margin guards against float rounding of the weights.
_BLEND_MARGIN = 1.005


def build_dataset(sources: list[tuple[str, float]], split: str, seq_len: int, num_samples: int, seed: int,
                  cache_dir: str | None) -> PackedDataset | BlendedDataset:
    """``sources = [(path, weight)]`` (paths as in ``resolve_prefixes``). One source: a PackedDataset;
    several: a BlendedDataset whose components are sized by weight (with a margin) so it never runs out.
    """
    if not sources:
        raise DatasetConfigError(f"{split}: no data sources")
    if len(sources) == 1:
        path, _ = sources[0]
        return PackedDataset(resolve_prefixes(path, split), seq_len, num_samples, seed, cache_dir, split)
    total = float(sum(w for _, w in sources))
    if num_samples <= 0:
        raise DatasetConfigError(f"{split}: a blend needs num_samples > 0 (got {num_samples})")
    children = []
    for path, weight in sources:
        if not weight > 0:
            raise DatasetConfigError(f"{split}: weight of {path} must be > 0, got {weight}")
        n = math.ceil(weight / total * num_samples * _BLEND_MARGIN) + 1
        children.append(PackedDataset(resolve_prefixes(path, split), seq_len, n, seed, cache_dir, split))
    return BlendedDataset(children, [w for _, w in sources], num_samples, cache_dir)
