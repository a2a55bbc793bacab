"""Tokenize documents into Megatron MMIDIDX shards: parallel, multi-node, resumable, deterministic.

Design (why the output is byte-identical for any ``--workers`` and any number of MPI ranks):

- The inputs are expanded into an ordered source list, then grouped into *units*: consecutive sources
  totalling about ``--unit-bytes`` on disk. An uncompressed JSON-lines or WikiExtractor file larger than
  ``--unit-bytes`` is cut into byte ranges of ``--unit-bytes``, one unit each, aligned to record
  boundaries by the reader (``readers.ReadRange``), so one 40 GB file spreads over all ranks and workers
  and resumes per range; a parquet file into runs of whole row groups of about ``--unit-bytes``
  (compressed, from its footer), a byte range that owns the row groups starting in it, its rows numbered
  from the file start (``readers.parquet``). Compressed files (.gz/.zst cannot seek) and text files (one
  document each: a huge one is streamed in pieces anyway) are never cut. An ``hf:`` dataset is one source per shard
  of its streaming dataset (for data files, one per file, with its size where local): its shards are
  grouped, distributed and resumed like files, and their records in shard order are the dataset's
  (``readers.hf``). The plan depends only on the inputs and ``--unit-bytes``, never on the worker or
  rank count (``plan``).
- A unit is read in order, tokenized in batches by a pool of worker threads (or processes, for a
  SentencePiece that holds the GIL: ``encode.resolve_backend``) with results consumed in submission
  order, and written to its own shards ``{split}/shard_{unit:05d}_{part:03d}``; a shard is closed when
  the next document would push it past ``--max-shard-bytes``. So every shard's bytes depend only on the
  unit's documents and the tokenizer (``writer``).
- MPI ranks each take a deterministic subset of the units (largest first, to the least loaded rank);
  rank 0 gathers the unit records over MPI (no shared filesystem needed for it) and writes the manifest
  listing all shards in unit order (``run``, ``data_pipeline.manifest``).
- A finished unit writes ``.state/unit_NNNNN.json`` atomically after its shards are renamed into place.
  A rerun verifies each recorded shard's sha256 and keeps it, and redoes unfinished units from scratch;
  so kill -9 at any moment loses at most the units in flight.
- The train/valid split is by a hash of each document's text (``--valid-fraction``), so it too is
  independent of how the work was distributed.

Shards are per unit, so a different ``--unit-bytes`` gives different shard files, but the same documents
in the same order (the concatenated token stream is identical). Error locations are ``file:line``; a
range counts lines from its own start and the manifest adds the line counts of the file's earlier ranges.

Nothing is lost silently: every record read is either written or counted as skipped by reason. A document
streamed in pieces (longer than ``--max-doc-bytes``) that turns out bad after some pieces were written
(invalid UTF-8, a read error, a missing ``</doc>``) is rolled back from its shard and counted as skipped:
a document is written whole or not at all.

    settings.py  Settings (what the output depends on), RunOptions (how to run), PipelineError
    plan.py      inputs -> units -> ranks; shard names
    encode.py    the tokenizer workers and split_exact
    writer.py    one unit's shards and record; the resume state of finished units
    run.py       preprocess(): configuration check, batches, progress, MPI orchestration
"""

from .encode import BACKEND_ENV, CHUNK_CHARS, resolve_backend, split_exact
from .run import preprocess
from .settings import PipelineError, RunOptions, Settings

__all__ = [
    "BACKEND_ENV", "CHUNK_CHARS", "PipelineError", "RunOptions", "Settings", "preprocess", "resolve_backend",
    "split_exact",
]
