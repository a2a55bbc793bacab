"""Megatron MMIDIDX indexed dataset: the one module that writes and reads ``.idx``/``.bin`` pairs.

The on-disk format is specified in ``docs/indexed_dataset_format.md`` and is byte-compatible
with Megatron-LM, Megatron-DeepSpeed and GPT-NeoX (``{prefix}.idx`` + ``{prefix}.bin``):

    idx = magic(9) | version u64 | dtype code u8 | N u64 | D u64
          | lengths int32[N] | pointers int64[N] | doc_index int64[D]
    bin = concatenated token ids of every sequence, no header

Writes are atomic: both files are written under temporary names and renamed into place only when
complete (``.bin`` first, then ``.idx``), so a prefix whose ``.idx`` exists is always whole.
"""

from __future__ import annotations

import array
import os
import struct
from pathlib import Path

import numpy as np

from lmforge.common.errors import InputError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # 9 magic + 8 version + 1 dtype + 8 N + 8 D

DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedDatasetError(InputError):
    """A ``.idx``/``.bin`` pair that is malformed, truncated or inconsistent."""


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Megatron's rule: uint16 when every id fits comfortably, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


class IndexedDatasetWriter:
    """Streams sequences into ``prefix.bin`` and keeps only the small index arrays in memory.

    Memory is O(number of sequences) for the index (12 bytes/sequence), never O(tokens). (Callers bound
    the sequences per writer: preprocess closes a shard at ``--max-shard-bytes``.)
    Use as a context manager; ``finalize()`` (called on clean exit) makes the pair visible atomically.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type = np.uint16):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = f"{self.prefix}.bin.tmp.{os.getpid()}"
        self._tmp_idx = f"{self.prefix}.idx.tmp.{os.getpid()}"
        self._bin = open(self._tmp_bin, "wb")
        # Compact arrays (4 + 8 bytes per entry, not ~36 for a list of Python ints): the index of a
        # 1 GiB shard of short documents has millions of entries.
        self._lengths = array.array("i")
        self._doc_index = array.array("q", [0])
        self.num_tokens = 0
        self._doc_start_tokens = 0
        self._closed = False

    def add_sequence(self, tokens) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._lengths.append(int(arr.size))
        self.num_tokens += int(arr.size)

    def end_document(self) -> None:
        self._doc_index.append(len(self._lengths))
        self._doc_start_tokens = self.num_tokens

    def drop_open_document(self) -> int:
        """Remove the sequences added since the last document boundary (a document abandoned half-way,
        e.g. a streamed one whose later bytes turn out to be bad); returns the tokens removed."""
        removed = self.num_tokens - self._doc_start_tokens
        del self._lengths[self._doc_index[-1] :]
        self._bin.flush()
        self._bin.seek(self._doc_start_tokens * self.dtype.itemsize)
        self._bin.truncate()
        self.num_tokens = self._doc_start_tokens
        return removed

    def add_document(self, tokens) -> None:
        """One document of one sequence (the layout preprocess_data.py writes without splitting).

        An empty document adds no sequence but still a document boundary, as Megatron does.
        """
        if len(tokens):
            self.add_sequence(tokens)
        self.end_document()

    @property
    def num_documents(self) -> int:
        return len(self._doc_index) - 1

    @property
    def open_document_tokens(self) -> int:
        """Tokens added since the last document boundary."""
        return self.num_tokens - self._doc_start_tokens

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    def bytes_written(self) -> int:
        return self.num_tokens * self.dtype.itemsize

    def finalize(self) -> None:
        if self._closed:
            return
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            # 64-bit accumulation: a 32-bit cumsum overflows past 2 GiB of tokens.
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_index = np.frombuffer(self._doc_index, dtype=np.int64)
        with open(self._tmp_idx, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", _CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_index)))
            f.write(lengths.astype("<i4").tobytes(order="C"))
            f.write(pointers.astype("<i8").tobytes(order="C"))
            f.write(doc_index.astype("<i8").tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._tmp_bin, f"{self.prefix}.bin")
        os.replace(self._tmp_idx, f"{self.prefix}.idx")
        self._closed = True

    def abort(self) -> None:
        if self._closed:
            return
        self._bin.close()
        for p in (self._tmp_bin, self._tmp_idx):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
        self._closed = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Memory-mapped reader for a ``prefix.idx``/``prefix.bin`` pair (ours, Megatron's or NeoX's).

    ``ds[i]`` is sequence i as a numpy view into the mapped ``.bin``; nothing is loaded eagerly.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        idx_path, bin_path = f"{self.prefix}.idx", f"{self.prefix}.bin"
        for p in (idx_path, bin_path):
            if not os.path.exists(p):
                raise IndexedDatasetError(f"{p}: no such file")
        buf = np.memmap(idx_path, mode="r", dtype=np.uint8)
        if len(buf) < HEADER_SIZE or bytes(buf[:9]) != MAGIC:
            raise IndexedDatasetError(f"{idx_path}: not an MMIDIDX index (bad magic)")
        (version,) = struct.unpack("<Q", bytes(buf[9:17]))
        if version != VERSION:
            raise IndexedDatasetError(f"{idx_path}: unsupported version {version}")
        code = int(buf[17])
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n, d = struct.unpack("<QQ", bytes(buf[18:34]))
        expected = HEADER_SIZE + 12 * n + 8 * d
        if len(buf) != expected:
            raise IndexedDatasetError(
                f"{idx_path}: size {len(buf)} bytes, expected {expected} for {n} sequences and "
                f"{d} document-index entries (truncated or corrupt)"
            )
        self._idx_buf = buf
        self.sequence_lengths = np.frombuffer(buf, dtype="<i4", count=n, offset=HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(buf, dtype="<i8", count=n, offset=HEADER_SIZE + 4 * n)
        self.document_indices = np.frombuffer(buf, dtype="<i8", count=d, offset=HEADER_SIZE + 12 * n)
        if d < 1 or int(self.document_indices[-1]) != n:
            raise IndexedDatasetError(f"{idx_path}: document index does not end at N={n}")
        bin_size = os.path.getsize(bin_path)
        total = int(self.sequence_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        if bin_size != total:
            raise IndexedDatasetError(f"{bin_path}: {bin_size} bytes, index describes {total}")
        self._bin = (
            np.memmap(bin_path, mode="r", dtype=self.dtype)
            if bin_size
            else np.zeros(0, dtype=self.dtype)
        )

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self._bin[start : start + int(self.sequence_lengths[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset+length)`` of sequence i, without touching the rest."""
        seq_len = int(self.sequence_lengths[i])
        if length is None:
            length = seq_len - offset
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self._bin[start : start + length]

    @property
    def tokens(self) -> np.ndarray:
        """The whole token stream, memory-mapped (sequences are contiguous in order)."""
        return self._bin


def exists(prefix: str | os.PathLike) -> bool:
    """Whether both files of ``prefix`` are there (a writer renames ``.idx`` into place last)."""
    return os.path.exists(f"{prefix}.idx") and os.path.exists(f"{prefix}.bin")
