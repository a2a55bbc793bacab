"""Session fixtures shared by the trainer, checkpoint and export tests (helpers live in tests/helpers/)."""

from __future__ import annotations

import pytest

from tests.helpers.runs import build_tiny_data


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """A real SentencePiece tokenizer (vocab 1000) and real shards of the shipped sample corpus."""
    return build_tiny_data(tmp_path_factory.mktemp("tiny_data"))
