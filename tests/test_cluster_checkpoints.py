"""Checkpoints as a cluster sees them: ranks on different nodes may see different files (stale network-filesystem
caches, a node-local run_dir), a write may fail on one rank, rank 0 may die while the others wait. Each test
runs real ranks (``tests/helpers/distributed.py``: real processes in a gloo group; or the real launchers), and
gives a rank a directory of its own where a node would see its own files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.distributed import run_distributed


def _tag(ckdir: Path, step: int, payload: bytes = b"weights" * 1000) -> None:
    """A complete tag as save.py leaves it: a data file, its record in lmforge.json, ``latest``."""
    from lmforge.model import build_config
    from lmforge.trainer import checkpoint
    from lmforge.trainer.checkpoint.integrity import crc32_file
    from lmforge.trainer.checkpoint.state import write_state
    from lmforge.trainer.config import RunConfig

    d = ckdir / checkpoint.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(payload)
    state = checkpoint.CheckpointState(
        step=step, consumed_samples=4 * step, model_config=build_config("llama", "debug").to_dict(),
        config=RunConfig().to_dict(), tokenizer=checkpoint.TokenizerRecord(), data_fingerprint="fp",
        precision="fp32", zero_stage=1, tensor_parallel=1, data_parallel=2, world_size=2, global_batch_size=4)
    f = d / "mp_rank_00_model_states.pt"  # recorded here by one rank (record_files is collective)
    state.files = {f.name: {"size": f.stat().st_size, "crc32": crc32_file(f)}}
    write_state(d, state)
    (ckdir / "latest").write_text(d.name)


def resume_decisions(root: str) -> dict:
    """On 2 ranks: what ``newest_intact``, ``record_files`` and ``check_shared_run_dir`` decide when rank 1 sees
    the same files as rank 0, older files, or none of them. Returns this rank's outcomes."""
    import torch.distributed as dist

    from lmforge.trainer.checkpoint import InconsistentViewError, check_shared_run_dir, newest_intact
    from lmforge.trainer.checkpoint.integrity import record_files

    rank = dist.get_rank()
    root = Path(root)
    out = {}
    logs = []

    def outcome(fn):
        try:
            return ("ok", fn())
        except InconsistentViewError as e:
            return ("inconsistent", str(e))

    # 1. One shared directory: both ranks resume from the tag rank 0 chose.
    shared = root / "shared" / "checkpoints"
    if rank == 0:
        _tag(shared, 2)
        _tag(shared, 4)
    dist.barrier()
    out["shared"] = outcome(lambda: newest_intact(shared, checksums=True, log=logs.append))
    # 2. Rank 1's view is stale: its latest complete tag is an older step, and it lacks step 4.
    stale = root / f"stale{rank}" / "checkpoints"
    shutil.copytree(shared, stale)
    if rank == 1:
        shutil.rmtree(stale / "step_00000004")
        (stale / "latest").write_text("step_00000002")
    out["stale"] = outcome(lambda: newest_intact(stale, checksums=True, log=logs.append))
    out["stale_kept"] = (stale / "step_00000004").is_dir() if rank == 0 else None  # not set aside
    # 3. Rank 1 sees step 4's state file but a truncated weights file (a cache serving an old length).
    partial = root / f"partial{rank}" / "checkpoints"
    shutil.copytree(shared, partial)
    if rank == 1:
        (partial / "step_00000004" / "mp_rank_00_model_states.pt").write_bytes(b"old")
    out["partial"] = outcome(lambda: newest_intact(partial, checksums=True, log=logs.append))
    out["partial_kept"] = (partial / "step_00000004").is_dir() if rank == 0 else None
    # 4. Real damage, as every rank sees it: set aside by rank 0, both resume from the previous tag.
    dist.barrier()
    if rank == 0:
        with open(shared / "step_00000004" / "mp_rank_00_model_states.pt", "r+b") as f:
            f.write(b"X")  # same size, different bytes: only the CRC-32 sees it
    dist.barrier()
    out["damaged"] = outcome(lambda: newest_intact(shared, checksums=True, log=logs.append))
    out["damaged_log"] = logs[-1] if rank == 0 and logs else ""
    # 5. The files recorded for a tag are every rank's: rank 1 wrote a file only its "node" sees.
    tag = root / f"node{rank}" / "step_00000006"
    tag.mkdir(parents=True)
    (tag / f"file_of_rank{rank}.pt").write_bytes(bytes(100 + rank))
    out["recorded"] = sorted(record_files(tag))
    # 6. The run_dir check: one shared directory passes, a directory per "node" is refused on every rank.
    out["run_dir_shared"] = outcome(lambda: check_shared_run_dir(root / "run"))
    out["run_dir_local"] = outcome(lambda: check_shared_run_dir(root / f"run_of_node{rank}"))
    return out


def test_one_resume_decision_for_all_ranks(tmp_path):
    r0, r1 = run_distributed(resume_decisions, 2, (str(tmp_path),), timeout=300)
    for r in (r0, r1):
        assert r["shared"] == ("ok", "step_00000004")
        for case in ("stale", "partial"):  # one error on every rank, naming rank 1 and what it saw
            assert r[case][0] == "inconsistent", (case, r[case])
        assert "rank 0 (" in r["stale"][1] and "sees step 4" in r["stale"][1] and "rank 1 (" in r["stale"][1]
        assert "no readable lmforge.json" in r["stale"][1]
        assert "newest complete checkpoint: step_00000002" in r["stale"][1]
        assert "3 bytes" in r["partial"][1]
        assert r["damaged"] == ("ok", "step_00000002")
        assert r["recorded"] == ["file_of_rank0.pt", "file_of_rank1.pt"]
        assert r["run_dir_shared"] == ("ok", None)
        assert r["run_dir_local"][0] == "inconsistent" and "is not one filesystem shared by all ranks" in \
            r["run_dir_local"][1] and "rank 1 (" in r["run_dir_local"][1]
    assert r0["stale_kept"] and r0["partial_kept"]  # a rank's stale view never sets a good tag aside
    assert "CRC-32" in r0["damaged_log"] and "set aside as step_00000004.damaged" in r0["damaged_log"]


def conversion_without_rank0(root: str, mode: str) -> tuple[str, float]:
    """Rank 0 either never converts (it died before writing anything) or converts slowly while its heartbeat
    runs; rank 1 waits in ``ensure_universal`` with a 6 s staleness bound."""
    import torch.distributed as dist

    from lmforge.trainer.checkpoint import CheckpointError, universal
    from lmforge.trainer.checkpoint.tags import universal_tag

    ckdir = Path(root)
    universal.HEARTBEAT_S = 1.0
    t0 = time.monotonic()
    if dist.get_rank() == 0:
        if mode == "dead":
            time.sleep(15)  # longer than rank 1's bound; then leave without a collective
            return "slept", 0.0

        def slow(ckpt_dir, tag, log=print):  # 3x the bound, heartbeat alive throughout
            time.sleep(18)
            out = ckpt_dir / universal_tag(tag)
            out.mkdir(parents=True)
            (out / universal.UNIVERSAL_MARKER).write_text(f'{{"source_tag": "{tag}"}}')

        universal.convert_to_universal = slow
    try:
        universal.ensure_universal(ckdir, "step_00000002", poll_s=0.2, stale_s=6.0)
        return "converted", time.monotonic() - t0
    except CheckpointError as e:
        return str(e), time.monotonic() - t0


@pytest.mark.slow
def test_waiting_for_the_universal_conversion_has_a_deadline(tmp_path):
    _, (msg, waited) = run_distributed(conversion_without_rank0, 2, (str(tmp_path), "dead"), timeout=120)
    assert "rank 0 died or hangs" in msg and "never appeared" in msg, msg
    assert 6 <= waited < 12, waited  # the stated bound (6 s here) plus at most a poll and start-up skew
    results = run_distributed(conversion_without_rank0, 2, (str(tmp_path / "slow"), "slow"), timeout=120)
    assert [m for m, _ in results] == ["converted", "converted"]  # a slow but living rank 0 is waited for
    assert results[1][1] > 17


@pytest.mark.slow
def test_a_failed_write_on_one_rank_stops_every_rank_at_once(tmp_path, tiny_data):
    """Rank 1's checkpoint writes fail (disk full, injected): both ranks stop within seconds of the save with
    one error naming rank 1 and the file, and the tag is never marked complete."""
    from lmforge.trainer import checkpoint
    from tests.helpers.runs import deepspeed_train, write_config

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, run, checkpoint={"interval": 2},
                       train={"max_steps": 6, "micro_batch_size": 2, "seed": 7, "precision": "fp32"})
    t0 = time.monotonic()
    p = deepspeed_train(cfg, [], nproc=2, check=False, LMFORGE_INJECT_SAVE_ERROR="1")
    elapsed = time.monotonic() - t0
    text = p.stdout + p.stderr
    assert p.returncode != 0, text[-3000:]
    assert "was not saved" in text and "rank 1: writing" in text and "No space left on device" in text, text[-3000:]
    assert checkpoint.complete_tags(run / "checkpoints") == []
    assert elapsed < 90, elapsed  # a start (~10 s) and two steps: not the 30-minute collective timeout


def durable_save(root: str) -> dict:
    """1 rank: a real DeepSpeed engine saved by checkpoint.save while os.fsync records what it is called on;
    returns the order of fsyncs and renames."""
    import os as _os

    import deepspeed

    from lmforge.model import build_config, build_model
    from lmforge.trainer import checkpoint
    from lmforge.trainer.config import RunConfig
    from lmforge.trainer.parallel.ds_config import build_ds_config

    cfg = RunConfig()
    cfg.parallel.zero_stage = 1
    mcfg = build_config("llama", "debug", vocab_size=256)
    model = build_model(mcfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=build_ds_config(cfg, 1, "fp32", mcfg))
    events = []
    real_fsync, real_replace = _os.fsync, _os.replace

    def fsync(fd):
        events.append(("fsync", _os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("rename", str(b)))
        return real_replace(a, b)

    _os.fsync, _os.replace = fsync, replace
    ckdir = Path(root) / "checkpoints"
    state = checkpoint.CheckpointState(
        step=1, consumed_samples=2, model_config=mcfg.to_dict(), config=cfg.to_dict(),
        tokenizer=checkpoint.TokenizerRecord(), data_fingerprint="fp", precision="fp32", zero_stage=1,
        tensor_parallel=1, data_parallel=1, world_size=1, global_batch_size=2)
    try:
        tag = checkpoint.save(engine, ckdir, state)
    finally:
        _os.fsync, _os.replace = real_fsync, real_replace
    files = sorted(str(ckdir / tag / f) for f in checkpoint.read_state(ckdir / tag).files)
    return {"events": events, "files": files, "tag_dir": str(ckdir / tag), "ckdir": str(ckdir)}


def test_a_checkpoint_is_durable_before_it_is_complete(tmp_path):
    """Every file of the tag (DeepSpeed's and the RNG state) is fsynced, then the tag directory; only then is
    lmforge.json renamed into place and its directory fsynced, and then ``latest``."""
    (r,) = run_distributed(durable_save, 1, (str(tmp_path),), timeout=300)
    ev = r["events"]
    synced = [p for k, p in ev if k == "fsync"]
    complete = ev.index(("rename", f"{r['tag_dir']}/lmforge.json"))
    for f in r["files"]:  # fsynced (as a temporary sibling of its final name) before the tag is complete
        name = Path(f).name
        assert any(Path(p).name.startswith(f".{name}.tmp") and i < complete
                   for i, (k, p) in enumerate(ev) if k == "fsync"), f
    assert ev.index(("fsync", r["tag_dir"])) < complete
    latest = ev.index(("rename", f"{r['ckdir']}/latest"))
    assert complete < latest and ("fsync", r["ckdir"]) in ev[latest:]
    assert ("fsync", r["tag_dir"]) in ev[complete:latest]  # lmforge.json's directory entry
    assert len(r["files"]) >= 3 and synced


@pytest.mark.slow
def test_two_local_nodes_with_their_own_run_dirs_are_refused(tmp_path, tiny_data):
    """launch_scripts/two_nodes_local.sh -r: each "node" writes under its own run_dir, as node-local disks
    would; the trainer refuses at start-up, naming the rank that cannot see rank 0's file, before training."""
    from tests.helpers.paths import ROOT
    from tests.helpers.process import child_env, free_port
    from tests.helpers.runs import write_config

    cfg = write_config(tmp_path / "cfg.yaml", tiny_data, tmp_path / "unused")
    p = subprocess.run(["bash", ROOT / "launch_scripts" / "two_nodes_local.sh", "-p", str(free_port()), "-r",
                        str(tmp_path / "local"), str(cfg)], cwd=ROOT, env=child_env(), capture_output=True,
                       text=True, timeout=300)
    text = p.stdout + p.stderr
    assert p.returncode != 0
    assert "is not one filesystem shared by all ranks" in text and "rank 1 (" in text, text[-3000:]
    assert not any((tmp_path / "local").glob("node*/metrics.jsonl")), "trained before refusing"
    assert not os.path.exists(tmp_path / "unused")
