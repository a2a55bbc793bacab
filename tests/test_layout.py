"""The package layout follows the data: foundations -> corpus -> shards -> samples -> model -> engine ->
checkpoint -> Hugging Face, and each stage imports only the stages before it. These rules are read off the
import statements (those inside functions too), so a change that adds a back-edge or an import circle fails
here instead of silently tangling the architecture.

The importable names are lmforge's own (``lmforge.model`` -> model/, ``lmforge.trainer`` -> trainer/,
``lmforge.data_pipeline`` -> data_pipeline/, ``lmforge.common`` -> common/; pyproject.toml): nothing in the
repository imports the folders by their bare names, which a user's own ``model.py`` would shadow."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers.paths import ROOT

PACKAGES = ("common", "data_pipeline", "model", "trainer")
# Composition roots and command entry points may import any stage.
ROOTS = {"trainer/build.py", "trainer/train.py", "trainer/cli.py", "trainer/export_hf.py", "trainer/import_hf.py",
         "trainer/generate.py", "trainer/verify_checkpoint.py", "trainer/launch.py"}
# The trainer's stages in flow order: a module may import its own stage and earlier ones only.
TRAINER_STAGES = [
    ("config", ("trainer/config.py", "trainer/schedule.py", "trainer/signals.py", "trainer/faults.py",
                "trainer/metrics.py", "trainer/__init__.py")),
    ("batching", ("trainer/batching.py",)),
    ("parallel", ("trainer/parallel/",)),
    ("plan", ("trainer/plan/",)),
    ("checkpoint", ("trainer/checkpoint/",)),
    ("hf", ("trainer/hf/",)),
]


def module_name(rel: Path) -> str:
    """trainer/checkpoint/state.py -> trainer.checkpoint.state; a package's __init__ -> the package."""
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p.relative_to(ROOT)): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(path: Path, rel: Path | None = None, known: set[str] | frozenset = frozenset()) -> set[str]:
    """Module names ``path`` imports, without the ``lmforge.`` prefix (relative imports resolved against its
    place ``rel`` in the repository: by default where it is). ``from pkg import x`` names ``pkg.x`` when that
    is a module in ``known``, else ``pkg``."""
    rel = rel or path.relative_to(ROOT)
    package = list(rel.parts[:-1])  # a module's package; __init__'s own
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.removeprefix("lmforge.") for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else [])).removeprefix("lmforge.")
            for a in node.names:
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    return out


def graph() -> dict[str, set[str]]:
    """Module -> the lmforge modules it imports (the longest importing prefix that is a module)."""
    mods = all_modules()
    known = set(mods)
    edges = {}
    for name, path in mods.items():
        targets = set()
        for imp in imports(path, known=known):
            parts = imp.split(".")
            for n in range(len(parts), 0, -1):
                if ".".join(parts[:n]) in known:
                    targets.add(".".join(parts[:n]))
                    break
        edges[name] = targets - {name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def modules(prefix: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): imports(p) for p in sorted((ROOT / prefix).rglob("*.py"))}


def offending(mods: dict[str, set[str]], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{f} imports {m}" for f, ims in mods.items() for m in sorted(ims)
            if any(m == p or m.startswith(p + ".") for p in forbidden)]


def test_no_import_circles():
    assert cycles(graph()) == []


def test_common_imports_no_lmforge_stage():
    assert offending(modules("common"), ("data_pipeline", "model", "trainer", "torch", "deepspeed")) == []


def test_data_pipeline_depends_on_no_later_stage():
    assert offending(modules("data_pipeline"), ("model", "trainer", "torch", "deepspeed")) == []


def test_model_is_a_plain_module():
    assert offending(modules("model"), ("trainer", "data_pipeline", "deepspeed", "torch.distributed")) == []
    # Only the registry may know the families; no family imports another one.
    fams = [p.name for p in (ROOT / "model").iterdir() if (p / "__init__.py").is_file() and p.name != "common"]
    for fam in fams:
        others = tuple(f"model.{o}" for o in fams if o != fam)
        assert offending(modules(f"model/{fam}"), others) == [], fam
    others = modules("model")
    outside = {f: ims for f, ims in others.items() if not f.startswith(tuple(f"model/{x}/" for x in fams))
               and f != "model/registry.py"}
    assert offending(outside, tuple(f"model.{x}" for x in fams)) == []


def test_trainer_stages_import_only_earlier_stages():
    mods = {f: ims for f, ims in modules("trainer").items() if f not in ROOTS}
    for i, (stage, prefixes) in enumerate(TRAINER_STAGES):
        later = tuple(f"trainer.{s}" for s, _ in TRAINER_STAGES[i + 1:]) + ("trainer.build", "trainer.train")
        mine = {f: ims for f, ims in mods.items() if f.startswith(prefixes)}
        assert mine, stage
        assert offending(mine, later) == [], stage
    staged = tuple(p for _, ps in TRAINER_STAGES for p in ps)
    assert sorted(f for f in mods if not f.startswith(staged)) == []  # every module has a stage


def test_nothing_imports_the_folders_by_their_bare_names():
    """``import model`` / ``from trainer...`` would pick up a user's model.py (tests/test_launch.py runs the
    commands from a directory holding such files)."""
    bare = []
    for p in sorted(ROOT.rglob("*.py")):
        if any(part in (".venv", "runs", ".git") or part.startswith(".") for part in p.relative_to(ROOT).parts):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            bare += [f"{p.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in PACKAGES]
    assert bare == []


def test_every_lmforge_import_resolves():
    """Every ``from lmforge... import name`` in the repository (code, tests, benchmarks; inside functions
    too) names a module or an attribute that exists: a moved or renamed name fails here, not in a script
    nobody ran."""
    import importlib

    missing = []
    for p in sorted(ROOT.rglob("*.py")):
        if any(part in (".venv", "runs", ".git") or part.startswith(".") for part in p.relative_to(ROOT).parts):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lmforge")):
                continue
            try:
                module = importlib.import_module(node.module)
            except ImportError as e:
                missing.append(f"{p.relative_to(ROOT)}: {node.module} ({e})")
                continue
            for a in node.names:
                if not hasattr(module, a.name):
                    try:
                        importlib.import_module(f"{node.module}.{a.name}")
                    except ImportError:
                        missing.append(f"{p.relative_to(ROOT)}: {node.module}.{a.name}")
    assert missing == []


def test_pyproject_lists_every_package():
    """A wheel holds exactly the packages pyproject.toml lists (the editable install finds the others, so
    only a built wheel would miss one)."""
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python >= 3.11; lmforge supports 3.10)
    section = text.split("[tool.setuptools]", 1)[1].split("\n[", 1)[0]
    package_dir = dict(re.findall(r'"(lmforge\.\w+)" = "(\w+)"', section.split("packages =", 1)[0]))
    assert package_dir == {f"lmforge.{p}": p for p in PACKAGES}
    listed = re.findall(r'^\s*"(lmforge[\w.]*)",?$', section.split("packages =", 1)[1], flags=re.M)
    on_disk = sorted("lmforge." + module_name(p.relative_to(ROOT)) for pkg in PACKAGES
                     for p in (ROOT / pkg).rglob("__init__.py"))
    assert sorted(listed) == on_disk


def test_the_rules_can_fail(tmp_path):
    """The import reader sees relative imports too (what the rules above would miss otherwise), and the
    circle finder finds a circle."""
    f = tmp_path / "probe.py"
    f.write_text("from ..hf import export\nfrom . import state\nimport deepspeed\nfrom lmforge.model import x\n")
    ims = imports(f, rel=Path("trainer/checkpoint/probe.py"), known={"trainer.checkpoint.state"})
    assert {"trainer.hf", "trainer.checkpoint.state", "deepspeed", "model"} <= ims
    assert offending({"x": ims}, ("trainer.hf",)) == ["x imports trainer.hf"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert module_name(Path("trainer/checkpoint/__init__.py")) == "trainer.checkpoint"
