"""JSON lines (``.jsonl``/``.json``/``.ndjson``, WikiExtractor ``--json`` output): one document per line,
its text in ``opts.text_key``.

Only a line path: a JSON object must be parsed whole, so there is nothing to gain from blocks, and the
line path is what byte ranges (``ReadRange``) need. Lines longer than ``max_line_bytes`` are skipped
without being held in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from .items import SKIP, Item, ReadOptions, check_text, reason
from .lines import ReadRange, iter_lines


def read(path: str, opts: ReadOptions, rng: ReadRange | None = None) -> Iterator[Item]:
    for lineno, raw, err in iter_lines(path, opts.max_line_bytes, rng):
        loc = f"{path}:{lineno}"
        if err is not None:
            yield (SKIP, reason(err), loc)
            continue
        assert raw is not None
        if not raw.strip():
            yield (SKIP, "blank_line", loc)
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield (SKIP, "invalid_utf8", loc)
            continue
        except ValueError:
            yield (SKIP, "invalid_json", loc)
            continue
        if not isinstance(obj, dict):
            yield (SKIP, "missing_text", loc)
            continue
        yield check_text(obj.get(opts.text_key), loc, opts)
