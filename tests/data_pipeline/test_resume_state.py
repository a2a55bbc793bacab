"""Resume state that cannot be mistaken: unit records and dedup signature files carry the settings that made
them and are rejected (named) under other settings; ``--overwrite`` moves the old output aside in one rename
before deleting it; an error on one MPI rank ends every rank at once."""

from __future__ import annotations

import dataclasses
import functools
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
                           for k, v in json.loads(rec.read_text())["settings"].items() if k != "versions"})
    logged: list[str] = []
    assert dedup.load_signatures(out, 1, settings, logged.append, segs) is not None and not logged
    assert dedup.load_signatures(out, 1, settings, logged.append, [(*segs[0][:2], segs[0][2] + 1)]) is None
    assert logged and "made for other input segments: scanned again" in logged[0]


def _restamp(stamp: dict, versions: dict | None) -> dict:
    """A stamp with other versions (``None``: none recorded, as state from before versions were)."""
    stamp = {k: v for k, v in stamp.items() if k != "versions"}
    return stamp if versions is None else {**stamp, "versions": versions}


def _restamp_signatures(path, versions: dict | None) -> None:
    import numpy as np

    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["settings"] = _restamp(meta["settings"], versions)
    arrays["meta"] = np.asarray(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_dedup_state_from_before_streamed_documents_were_candidates_is_rejected(tok, tmp_path):  # noqa: F811
    """Unit records and signature files of a --dedup run made before documents streamed in pieces (over
    --max-doc-bytes) were exact-dedup candidates carry no dedup state version in their stamp (version 1): such
    a unit record may hold a streamed duplicate, written; such a signature file numbers its candidates without
    the streamed ones. Crafted here as that version left them (the copy's unit as a run without dedup writes
    it, the record without ``streamed_candidates``, the stamps without ``versions``): every one is rejected
    with a line naming the version and why, and the output equals a fresh run's. The same state stamped as
    the current version would be reused, the duplicate written (what the version is there to stop)."""
    from lmforge.data_pipeline.manifest import load_manifest
    from lmforge.data_pipeline.tools import verify
    from tests.helpers.paths import SAMPLE

    book = (SAMPLE / "books/pg1952.txt").read_bytes()  # 50 KB: streamed in pieces of 20 KB
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a_book.txt").write_bytes(book)
    (tmp_path / "in" / "b_copy.txt").write_bytes(book.replace(b"\n", b"\r\n"))  # its streamed exact copy
    args = ("--workers", "1", "--max-doc-bytes", "20k", "--unit-bytes", "60k", "--valid-fraction", "0",
            "--dedup", "exact")
    run = functools.partial(preprocess, tok, inputs=[tmp_path / "in"])
    fresh, plain = tmp_path / "fresh", tmp_path / "plain"
    run(fresh, *args)
    m = load_manifest(fresh)
    assert m["skipped"] == {"duplicate-exact": 1} and m["dedup"] == {"streamed_exact_only": 2}, m
    run(plain, *args[:-2])  # without dedup: the copy's unit as the old version wrote it
    copy_unit = next(u for u in (0, 1) if json.loads((plain / ".state" / f"unit_{u:05d}.json").read_text())
                     ["segments"][0][0] == 1)

    def old_state(dst, versions):
        shutil.copytree(fresh, dst)
        (dst / "manifest.json").unlink()  # killed before its manifest
        stamp = json.loads((fresh / ".state" / "unit_00000.json").read_text())["settings"]
        assert stamp["versions"] == {"dedup_state": 2}
        for u in (0, 1):
            rec_path = dst / ".state" / f"unit_{u:05d}.json"
            rec = json.loads((plain if u == copy_unit else fresh).joinpath(rec_path.relative_to(dst)).read_text())
            if u == copy_unit:
                del rec["streamed_candidates"]
                for sh in rec["shards"]["train"]:
                    for ext in (".bin", ".idx"):
                        shutil.copy(plain / f"{sh['prefix']}{ext}", dst / f"{sh['prefix']}{ext}")
            rec["settings"] = _restamp(stamp, versions)
            rec_path.write_text(json.dumps(rec))
            _restamp_signatures(dst / ".state" / "dedup" / f"unit_{u:05d}.npz", versions)

    old_state(tmp_path / "current", {"dedup_state": 2})  # wrongly stamped as the current version: reused
    p = run(tmp_path / "current", *args)
    assert "2 unit(s) verified and kept" in p.stderr, p.stderr
    assert load_manifest(tmp_path / "current")["records"]["written"] == 2  # the duplicate too

    old = tmp_path / "old"
    old_state(old, None)
    p = run(old, *args)
    why = "made with other settings (dedup state version none -> 2: documents streamed over --max-doc-bytes are " \
          "exact-dedup candidates since version 2)"
    for u in (0, 1):
        assert f"unit_{u:05d}.json: {why}: not reused, the unit is done again" in p.stderr, p.stderr
        assert f"unit_{u:05d}.npz: {why}: scanned again" in p.stderr, p.stderr
    same_tree(old, fresh)
    assert verify(old) == []


def _edit_stamps(out, edit) -> int:
    """``edit(stamp)`` applied to the settings stamp of every unit record and signature file of ``out``."""
    import numpy as np

    n = 0
    for rec_path in (out / ".state").glob("unit_*.json"):
        rec = json.loads(rec_path.read_text())
        edit(rec["settings"])
        rec_path.write_text(json.dumps(rec))
        n += 1
    for path in (out / ".state" / "dedup").glob("unit_*.npz"):
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays["meta"]))
        edit(meta["settings"])
        arrays["meta"] = np.asarray(json.dumps(meta))
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        n += 1
    return n


def test_a_setting_missing_from_old_state_is_its_default(tok, tmp_path):  # noqa: F811
    """State written before a setting existed (here ``titles``: --no-titles came later) has no key for it: it
    was made the way the default makes it, so it is reused when the setting is at its default, and rejected
    (naming it) when not."""
    from lmforge.data_pipeline.preprocess.settings import Settings
    from tests.helpers.paths import SAMPLE

    out = tmp_path / "out"
    run = functools.partial(preprocess, tok, out, "--workers", "1", "--dedup", "exact",
                            inputs=[SAMPLE / "wikipedia"])
    run()
    units = len(list((out / ".state").glob("unit_*.json")))
    assert units >= 2 and _edit_stamps(out, lambda stamp: stamp.pop("titles")) == 2 * units  # records, signatures
    (out / "manifest.json").unlink()  # killed before its manifest
    p = run()
    assert "made with other settings" not in p.stderr, p.stderr
    assert f"{units} unit(s) verified and kept, 0 to do" in p.stderr, p.stderr
    stamp = json.loads((out / ".state" / "unit_00000.json").read_text())["settings"]
    assert "titles" not in stamp
    settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in stamp.items() if k != "versions"})
    assert settings.titles and settings.differences(stamp) == []
    assert dataclasses.replace(settings, titles=False).differences(stamp) == ["--titles True -> False"]
    # The output of another job for --no-titles (its config.json records the setting when it is not the default).
    p = run("--no-titles", check=False)
    assert p.returncode == 2 and "holds output of a different job: settings differ (titles)" in p.stderr, p.stderr
    # State stamped with titles kept, under --no-titles (the config.json gone, as after a kill during
    # --overwrite): rejected, naming the setting.
    assert _edit_stamps(out, lambda stamp: stamp.update(titles=True)) == 2 * units
    (out / ".state" / "config.json").unlink()
    (out / "manifest.json").unlink()
    p = run("--no-titles")
    why = "made with other settings (--titles True -> False)"
    assert p.stderr.count(f"{why}: not reused, the unit is done again") == units, p.stderr
    assert p.stderr.count(f"{why}: scanned again") == units, p.stderr
    preprocess(tok, tmp_path / "fresh", "--workers", "1", "--dedup", "exact", "--no-titles",
               inputs=[SAMPLE / "wikipedia"])
    same_tree(out, tmp_path / "fresh")
