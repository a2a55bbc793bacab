"""Hugging Face datasets ``hf:NAME[:CONFIG][@SPLIT]`` (a hub name, online, or a local path or builder),
read with ``datasets.load_dataset(..., streaming=True)``: one document per record, its text in
``opts.text_key``. Never split into byte ranges."""

from __future__ import annotations

from collections.abc import Iterator

from .items import Item, ReadOptions, check_text
from .lines import ReadRange
from .sources import InputError


def read(spec: str, opts: ReadOptions, rng: ReadRange | None = None) -> Iterator[Item]:
    """Records of ``spec`` as items at ``spec:row``; ``rng`` is always None (not splittable)."""
    import datasets

    body, _, split = spec[3:].partition("@")
    name, _, config = body.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except ValueError as e:  # an unknown config or split name
        raise InputError(f"{spec}: {e}") from None
    for row, rec in enumerate(ds, start=1):
        yield check_text(rec.get(opts.text_key), f"{spec}:{row}", opts)
