"""The package layout follows the data: corpus -> shards -> samples -> engine -> checkpoint -> Hugging Face,
and each stage imports only the stages before it. These rules are read off the import statements, so a
change that adds a back-edge fails here instead of silently tangling the architecture."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.paths import ROOT

# Composition roots and command entry points may import any stage.
ROOTS = {"trainer/build.py", "trainer/train.py", "trainer/cli.py", "trainer/export_hf.py", "trainer/import_hf.py",
         "trainer/generate.py", "trainer/verify_checkpoint.py", "trainer/launch.py"}


def imports(path: Path, rel: Path | None = None) -> set[str]:
    """Absolute module names ``path`` imports (relative imports resolved against its package, from its
    place ``rel`` in the repository: by default where it is)."""
    package = list((rel or path.relative_to(ROOT)).parts[:-1])  # a module's package; __init__'s own
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def modules(pkg: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): imports(p) for p in sorted((ROOT / pkg).rglob("*.py"))}


def offending(mods: dict[str, set[str]], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{f} imports {m}" for f, ims in mods.items() for m in sorted(ims)
            if any(m == p or m.startswith(p + ".") for p in forbidden)]


def test_data_pipeline_depends_on_no_later_stage():
    assert offending(modules("data_pipeline"), ("model", "trainer", "torch", "deepspeed")) == []


def test_model_is_a_plain_module():
    assert offending(modules("model"), ("trainer", "data_pipeline", "deepspeed", "torch.distributed")) == []


def test_trainer_stages_import_only_earlier_stages():
    mods = {f: ims for f, ims in modules("trainer").items() if f not in ROOTS}
    engine = {f: ims for f, ims in mods.items() if not f.startswith(("trainer/checkpoint/", "trainer/hf/"))}
    assert offending(engine, ("trainer.checkpoint", "trainer.hf", "trainer.build", "trainer.train")) == []
    checkpoint = {f: ims for f, ims in mods.items() if f.startswith("trainer/checkpoint/")}
    assert offending(checkpoint, ("trainer.hf", "trainer.build", "trainer.train")) == []
    hf = {f: ims for f, ims in mods.items() if f.startswith("trainer/hf/")}
    assert offending(hf, ("trainer.build", "trainer.train", "trainer.engine", "trainer.deepspeed_compat")) == []


def test_the_rules_can_fail(tmp_path):
    """The import reader sees relative imports too (what the rules above would miss otherwise)."""
    f = tmp_path / "probe.py"
    f.write_text("from ..hf import export\nfrom . import state\nimport deepspeed\n")
    ims = imports(f, rel=Path("trainer/checkpoint/probe.py"))
    assert {"trainer.hf", "trainer.hf.export", "trainer.checkpoint.state", "deepspeed"} <= ims
    assert offending({"x": ims}, ("trainer.hf",)) == ["x imports trainer.hf", "x imports trainer.hf.export"]
