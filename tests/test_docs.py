"""The documentation tells the truth: every lmforge command shown in README.md and docs/ is one a test or a
benchmark runs, and docs/adding-a-model-family.md, followed in a copy of the source tree, adds a working
family."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import BIN, ROOT
from tests.helpers.process import run_cmd
from tests.helpers.runs import write_config

DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
FAMILY_PAGE = ROOT / "docs" / "adding-a-model-family.md"
# What tests and benchmarks run: their sources, and the launch scripts (which tests/test_launch.py and
# tests/test_stops.py run).
RUNNERS = [p for p in sorted((ROOT / "tests").rglob("*.py")) if p.name != "test_docs.py"] + sorted(
    (ROOT / "benchmarks").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.sh")) + sorted(
    (ROOT / "launch_scripts").glob("*"))
# ``lmforge COMMAND`` (trainer/cli.py) -> the module and subcommand it runs.
CLI = {"train-tokenizer": ("lmforge.data_pipeline", "train-tokenizer"),
       "preprocess": ("lmforge.data_pipeline", "preprocess"), "inspect": ("lmforge.data_pipeline", "inspect"),
       "verify": ("lmforge.data_pipeline", "verify"), "merge": ("lmforge.data_pipeline", "merge"),
       "train": ("lmforge.trainer.train", ""), "export-hf": ("lmforge.trainer.export_hf", ""),
       "import-hf": ("lmforge.trainer.import_hf", ""), "generate": ("lmforge.trainer.generate", ""),
       "plan": ("lmforge.trainer.plan", "")}
SUBCOMMANDS = {"lmforge.data_pipeline": {"train-tokenizer", "preprocess", "inspect", "verify", "merge"}}


def bash_blocks(page: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)


def commands(block: str) -> list[list[str]]:
    """Shell commands of a code block: continuation lines joined, comments dropped, split at ; && || |."""
    out = []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unfinished quote: a multi-line python -c (checked by running it)
            continue
        cmd = []
        for t in tokens + [";"]:
            if t in (";", "&&", "||", "|"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(t)
    return out


def entry_point(cmd: list[str]) -> tuple[str, str, list[str]] | None:
    """(what runs, its subcommand, its --flags) for a command that runs lmforge; None for other programs
    (tensorboard, tail, make, ...)."""
    while cmd and (re.match(r"^\w+=", cmd[0]) or cmd[0] in ("exec", "bash", "sbatch", "timeout")):
        cmd = cmd[2:] if cmd[0] == "timeout" else cmd[1:]
    if cmd and cmd[0] in ("mpirun", "mpiexec"):
        while cmd and not re.search(r"python3?$", cmd[0]):
            cmd = cmd[1:]
    if not cmd:
        return None
    flags = sorted({t.split("=")[0] for t in cmd if t.startswith("--")})
    head = cmd[0]
    if re.search(r"python3?$", head) and len(cmd) > 2 and cmd[1] == "-m":
        module = cmd[2]
        if not module.startswith("lmforge"):
            return None
        sub = cmd[3] if module in SUBCOMMANDS and len(cmd) > 3 and cmd[3] in SUBCOMMANDS[module] else ""
        return module, sub, flags
    if re.search(r"python3?$", head) and len(cmd) > 1 and cmd[1].startswith(("benchmarks/", "launch_scripts/")):
        return cmd[1], "", flags
    if head == "lmforge" and len(cmd) > 1 and cmd[1] in CLI:
        module, sub = CLI[cmd[1]]
        return module, sub, flags
    if head == "deepspeed" and "--module" in cmd:
        return cmd[cmd.index("--module") + 1], "", [f for f in flags if f != "--module"]
    if head.startswith(("launch_scripts/", "benchmarks/")):
        return head, "", flags
    return None


def runner_sources() -> dict[Path, str]:
    return {p: p.read_text(errors="replace") for p in RUNNERS if p.is_file()}


def covered(what: str, sub: str, flags: list[str], sources: dict[Path, str]) -> list[str]:
    """The flags of a documented command that no single test or benchmark file runs it with."""
    name = what.rsplit("/", 1)[-1]
    best = None
    for text in sources.values():
        if name not in text or (sub and sub not in text):
            continue
        missing = [f for f in flags if f not in text]
        if best is None or len(missing) < len(best):
            best = missing
    return ["(not run by any test or benchmark)"] if best is None else best


def test_every_documented_command_is_run_by_a_test_or_a_benchmark():
    sources = runner_sources()
    problems, seen = [], 0
    for page in DOCS:
        for block in bash_blocks(page):
            for cmd in commands(block):
                ep = entry_point(cmd)
                if ep is None:
                    continue
                seen += 1
                missing = covered(*ep, sources)
                if missing:
                    problems.append(f"{page.relative_to(ROOT)}: {' '.join(cmd)[:100]} -- {', '.join(missing)}")
    assert seen > 20, seen  # the docs show commands, and the reader finds them
    assert problems == []


def test_the_command_check_can_fail():
    sources = runner_sources()
    assert entry_point(["python", "-m", "lmforge.data_pipeline", "preprocess", "--no-such-flag"]) == (
        "lmforge.data_pipeline", "preprocess", ["--no-such-flag"])
    assert covered("lmforge.data_pipeline", "preprocess", ["--no-such-flag"], sources) == ["--no-such-flag"]
    assert covered("launch_scripts/nope.sh", "", [], sources) == ["(not run by any test or benchmark)"]
    assert entry_point(["tensorboard", "--logdir", "x"]) is None


def _python_blocks(page: Path) -> dict[str, str]:
    """The page's Python blocks that start with the comment naming their file."""
    files = {}
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
        first, _, body = block.partition("\n")
        m = re.fullmatch(r"# (model/\S+\.py)", first.strip())
        if m:
            files[m.group(1)] = body
    return files


def _shell_commands(page: Path) -> list[str]:
    """Every command of the page's bash blocks, multi-line ``python -c`` included, continuation joined."""
    out = []
    for block in bash_blocks(page):
        text = re.sub(r"\\\n\s*", " ", block)
        buf = ""
        for line in text.splitlines(keepends=True):
            buf += line
            try:
                shlex.split(buf, comments=True)
            except ValueError:
                continue  # inside a quote: the command goes on
            if buf.strip() and not buf.strip().startswith("#"):
                out.append(buf.strip())
            buf = ""
    return out


@pytest.mark.slow
def test_a_family_added_by_following_the_docs(tmp_path, tiny_data):
    """docs/adding-a-model-family.md in a copy of the source tree: its four files written as the page shows
    them, then every command of the page run as written (python and deepspeed from this environment, the
    page's ``configs/demo.yaml`` a config over the test data, in a fresh working directory)."""
    src = tmp_path / "src" / "lmforge"
    for pkg in ("common", "data_pipeline", "model", "trainer"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "sample_corpus"))
    files = _python_blocks(FAMILY_PAGE)
    assert sorted(files) == ["model/olmo/__init__.py", "model/olmo/config.py", "model/olmo/hf.py",
                             "model/olmo/model.py"]
    for rel, body in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(body)
    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    write_config(work / "configs" / "demo.yaml", tiny_data, work / "runs" / "demo")
    env = {"PYTHONPATH": str(tmp_path / "src")}
    cmds = _shell_commands(FAMILY_PAGE)
    assert [c.split()[0] for c in cmds] == ["python", "python", "deepspeed", "python"], cmds
    outputs = []
    for c in cmds:
        argv = shlex.split(c)
        argv[0] = sys.executable if argv[0] == "python" else str(BIN / argv[0])
        if argv[0].endswith("deepspeed"):
            argv[1:1] = ["--master_addr", "127.0.0.1"]
        outputs.append(run_cmd(argv, cwd=work, timeout=600, **env).stdout)
    count = re.search(r"prints `\['llama', 'olmo', 'qwen3', 'qwen3_moe'\]` and `([\d.]+)`", FAMILY_PAGE.read_text())
    assert count and outputs[0].split() == ["['llama',", "'olmo',", "'qwen3',", "'qwen3_moe']", count.group(1)], \
        outputs[0]
    assert "max abs logit difference" in outputs[1]
    assert "world 2 = dp 1 × tp 2 | ZeRO-3" in outputs[2], outputs[2][-2000:]
    export = work / "runs" / "olmo" / "hf"
    assert '"OlmoForCausalLM"' in (export / "config.json").read_text()
    assert "exported and verified" in outputs[3]
