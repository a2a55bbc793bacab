"""Resume state that cannot be mistaken: unit records and dedup signature files carry the settings that made
them and are rejected (named) under other settings; ``--overwrite`` moves the old output aside in one rename
before deleting it; an error on one MPI rank ends every rank at once."""

from __future__ import annotations

import json
import shutil
import time

from tests.data_pipeline.test_preprocess import preprocess, same_tree, tok  # noqa: F401
from tests.helpers.paths import BIN


def test_state_from_other_settings_is_rejected_by_name(tok, tmp_path):  # noqa: F811
    """The case a kill during the old, non-atomic --overwrite could leave: the state of a run with --dedup exact
    and no filter, without its .state/config.json (deleted first), then a rerun with --filter gopher. Candidate
    numbering depends on the filter, so the old signatures would drop the wrong documents: every unit record and
    signature file is rejected, naming --filters, and the output equals a fresh run's."""
    old, fresh = tmp_path / "old", tmp_path / "fresh"
    preprocess(tok, old, "--workers", "1", "--dedup", "exact")
    assert list((old / ".state" / "dedup").glob("unit_*.npz")) and list((old / ".state").glob("unit_*.json"))
    (old / ".state" / "config.json").unlink()
    (old / "manifest.json").unlink()
    p = preprocess(tok, old, "--workers", "1", "--dedup", "exact", "--filter", "gopher")
    log = p.stdout + p.stderr
    assert "made with other settings (--filters [] -> ['words', " in log and "): scanned again" in log, log[-3000:]
    assert "): not reused, the unit is done again" in log, log[-3000:]
    preprocess(tok, fresh, "--workers", "1", "--dedup", "exact", "--filter", "gopher")
    same_tree(old, fresh)
    # State written before stamps existed is not trusted either.
    rec = next((old / ".state").glob("unit_*.json"))
    d = json.loads(rec.read_text())
    del d["settings"]
    rec.write_text(json.dumps(d))
    (old / ".state" / "config.json").unlink()
    (old / "manifest.json").unlink()
    log = (lambda p: p.stdout + p.stderr)(preprocess(tok, old, "--workers", "1", "--dedup", "exact", "--filter",
                                                     "gopher"))
    assert "made with other settings ((none recorded)): not reused" in log
    same_tree(old, fresh)


def test_overwrite_moves_the_old_output_aside_in_one_rename(tok, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    preprocess(tok, out, "--workers", "1")
    # What a kill between the rename and the deletion leaves: cleaned up by the next start.
    leftover = out / ".overwritten.0.12345"
    shutil.copytree(out / ".state", leftover / ".state")
    preprocess(tok, out, "--workers", "1", "--dedup", "exact", "--overwrite")
    assert not list(out.glob(".overwritten.*"))
    preprocess(tok, tmp_path / "fresh", "--workers", "1", "--dedup", "exact")
    same_tree(out, tmp_path / "fresh")


def test_an_error_on_one_rank_ends_every_rank(tok, tmp_path):  # noqa: F811
    """Rank 1 fails as it enters the dedup exchange while rank 0 waits in its first collective: the job ends
    within seconds with rank 1's message, instead of rank 0 waiting forever."""
    from tests.data_pipeline.test_preprocess import INPUTS, PY
    from tests.helpers.process import run_cmd

    t0 = time.monotonic()
    p = run_cmd([BIN / "mpirun", "-n", "2", "-genv", "LMFORGE_INJECT_DEDUP_ERROR", "1", PY, "-m",
                 "lmforge.data_pipeline", "preprocess", "--input", *INPUTS, "--tokenizer", tok, "--output",
                 tmp_path / "out", "--no-progress", "--workers", "1", "--dedup", "exact"], check=False,
                timeout=120)  # without the abort it waits here until this timeout (measured: it hangs)
    elapsed = time.monotonic() - t0
    assert p.returncode != 0
    assert "injected failure on rank 1 before the dedup exchange" in p.stdout + p.stderr
    assert elapsed < 60, elapsed  # the scan of the test inputs takes a few seconds


def test_state_of_other_segments_is_rejected(tok, tmp_path):  # noqa: F811
    """A unit record or signature file made for other input segments than the plan's (a plan made by another
    version: parquet files were one unit before they were cut by row groups) is not reused: the unit is
    scanned and done again, with a line saying why, and the output equals a fresh run's."""
    from lmforge.data_pipeline.preprocess import dedup
    from lmforge.data_pipeline.preprocess.settings import Settings

    out = tmp_path / "out"
    preprocess(tok, out, "--workers", "1", "--dedup", "exact")
    rec = out / ".state" / "unit_00001.json"
    d = json.loads(rec.read_text())
    d["segments"] = [[s[0], s[1], s[2] + 1] for s in d["segments"]]
    rec.write_text(json.dumps(d))
    (out / "manifest.json").unlink()
    p = preprocess(tok, out, "--workers", "1", "--dedup", "exact")
    assert "unit_00001.json: made for other input segments" in p.stderr and "1 to do" in p.stderr, p.stderr
    preprocess(tok, tmp_path / "fresh", "--workers", "1", "--dedup", "exact")
    same_tree(out, tmp_path / "fresh")
    segs = [tuple(s) for s in json.loads(rec.read_text())["segments"]]
    settings = Settings(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in json.loads(rec.read_text())["settings"].items()})
    logged: list[str] = []
    assert dedup.load_signatures(out, 1, settings, logged.append, segs) is not None and not logged
    assert dedup.load_signatures(out, 1, settings, logged.append, [(*segs[0][:2], segs[0][2] + 1)]) is None
    assert logged and "made for other input segments: scanned again" in logged[0]
