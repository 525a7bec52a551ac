"""The layering, checked on the source with ``ast`` (nothing is imported). Every import counts, function-local
ones included.

Layers, bottom to top; a module imports ``pema`` modules of its own layer or below only:

0. formats and config: ``pema.config`` (with ``config_fields``, ``config_baselines``), ``pema.errors``, ``pema.profiling``, ``pema.formats``
1. the two parties and the baselines: ``pema.owner``, ``pema.adapter``, ``pema.baselines``
2. the stages: ``pema.stages``
3. executors and tracking: ``pema.executors`` (inline, Ray), ``pema.tracking`` (MLflow)
4. the jobs: ``pema.jobs``
5. the command: ``pema.commands`` (one module per ``pema`` subcommand) and ``pema.__main__``

Within a layer: the data owner's side (``adapter``, ``baselines``) never imports ``owner``, the owner never imports
the data owner's side, and executors and tracking do not import each other. Ray is imported by ``pema.executors``
and ``pema.jobs`` only, MLflow by ``pema.tracking`` and ``pema.jobs`` only. There is no import cycle (in ``faults/``
neither), and no source file is over 400 lines.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pema"
LAYERS = {"pema": 0, "pema.config": 0, "pema.config_fields": 0, "pema.config_baselines": 0, "pema.errors": 0,
          "pema.profiling": 0, "pema.formats": 0,
          "pema.owner": 1, "pema.adapter": 1, "pema.baselines": 1, "pema.stages": 2,
          "pema.executors": 3, "pema.tracking": 3, "pema.jobs": 4, "pema.commands": 5, "pema.__main__": 5}
APART = [("pema.adapter", "pema.owner"), ("pema.baselines", "pema.owner"), ("pema.owner", "pema.adapter"),
         ("pema.owner", "pema.baselines"), ("pema.executors", "pema.tracking"), ("pema.tracking", "pema.executors")]
ALLOWED = {"ray": ("pema.executors", "pema.jobs"), "mlflow": ("pema.tracking", "pema.jobs")}
PURE = ["formats/keys.py", "adapter/losses.py", "adapter/schedule.py", "adapter/model.py", "adapter/head.py",
        "adapter/phases.py", "baselines/knn.py"]
FILE_IO = {"os", "pathlib", "json", "pyarrow", "safetensors"}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import anywhere in the file; ``from a import b`` yields ``a.b``
    (b may be a module) and relative imports are resolved against the file's package (``module`` overrides the
    file's dotted name)."""
    package = (module or module_name(path)).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if base else alias.name) for alias in node.names]
    return found


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def group(name: str) -> str | None:
    """The layer group (a key of LAYERS) of a dotted ``pema`` name; None outside ``pema``."""
    matches = [g for g in LAYERS if under(name, g)]
    return max(matches, key=len) if matches else None


SOURCES = sorted(PKG.rglob("*.py"))
MODULES = {module_name(f): f for f in SOURCES}


def resolve(name: str) -> str | None:
    """The ``pema`` module an imported dotted name lives in (``pema.stages.decode.translate`` ->
    ``pema.stages.decode``); None outside ``pema``."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def edges() -> list[tuple[str, int, str]]:
    """(importing module, line, imported pema module) for every pema-internal import."""
    found = []
    for mod, f in MODULES.items():
        for line, name in imports(f):
            target = resolve(name) if under(name, "pema") else None
            if target and target != mod:
                found.append((mod, line, target))
    return found


def test_checker_sees_every_import_form(tmp_path):
    # guard the checker itself: each of these must be seen as an import of pema.owner
    probe = tmp_path / "probe.py"
    probe.write_text("import pema.owner\nfrom pema.owner.plm import x\nfrom pema import owner\n"
                     "from ..owner import y\nfrom .. import owner\ndef f():\n    import pema.owner.encode\n")
    found = imports(probe, module="pema.adapter.probe")
    assert [line for line, _ in found] == [1, 2, 3, 4, 5, 7]
    assert all(under(name, "pema.owner") for _, name in found), found
    assert not under("pema.ownership", "pema.owner")
    assert group("pema.stages.decode") == "pema.stages" and group("pema.config") == "pema.config"
    assert resolve("pema.stages.decode.translate") == "pema.stages.decode"


def test_every_module_is_in_a_layer():
    stray = [m for m in MODULES if group(m) is None or (group(m) == "pema" and m != "pema")]
    assert len(MODULES) > 30 and not stray, f"modules outside the layers of this test: {stray}"


def test_layers_import_only_downwards():
    bad = [f"{mod}:{line}: imports {target} (layer {LAYERS[group(target)]} above {LAYERS[group(mod)]})"
           for mod, line, target in edges() if LAYERS[group(target)] > LAYERS[group(mod)]]
    assert not bad, "a module imports a layer above its own:\n" + "\n".join(bad)


@pytest.mark.parametrize("importer,imported", APART)
def test_parties_and_integrations_stay_apart(importer, imported):
    bad = [f"{mod}:{line}: imports {target}" for mod, line, target in edges()
           if under(mod, importer) and under(target, imported)]
    assert not bad, f"{importer} must not import {imported}:\n" + "\n".join(bad)


@pytest.mark.parametrize("lib", sorted(ALLOWED))
def test_ray_and_mlflow_only_in_their_layers(lib):
    bad = [f"{mod}:{line}: imports {name}" for mod, f in MODULES.items() for line, name in imports(f)
           if name.split(".")[0] == lib and not any(under(mod, g) for g in ALLOWED[lib])]
    assert not bad, f"only {ALLOWED[lib]} may import {lib}:\n" + "\n".join(bad)


def import_graph(modules: dict[str, Path], root: str) -> dict[str, set[str]]:
    """``{module: the modules of modules it imports}`` for the modules of one top-level package ``root``."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, f in modules.items():
        for _, name in imports(f):
            target = name if under(name, root) else ""
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != mod:
                graph[mod].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycles():
    # a package's __init__ importing its own submodules is not a cycle of the layering; none of ours does it
    cycles = find_cycles(import_graph(MODULES, "pema"))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_cycles_in_faults():
    # the fuzzer's kinds register themselves in faults.fuzz_base.KINDS; faults.fuzz_cases imports them, not they it
    modules = {module_name(f): f for f in sorted((ROOT / "faults").rglob("*.py"))}
    graph = import_graph(modules, "faults")
    assert "faults.fuzz_kinds" in graph["faults.fuzz_cases"], "the checker no longer sees faults' imports"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in faults/:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    # guard the cycle test: a two-module cycle must be reported
    a, b = tmp_path / "pema" / "stages" / "a.py", tmp_path / "pema" / "stages" / "b.py"
    a.parent.mkdir(parents=True)
    a.write_text("def f():\n    from pema.stages import b\n")
    b.write_text("from pema.stages.a import f\n")
    monkeypatch.setattr(__import__(__name__), "PKG", tmp_path / "pema")
    monkeypatch.setattr(__import__(__name__), "MODULES", {"pema.stages.a": a, "pema.stages.b": b})
    with pytest.raises(AssertionError, match="pema.stages.a -> pema.stages.b -> pema.stages.a"):
        test_no_import_cycles()


@pytest.mark.parametrize("folder", ["pema", "jobs", "bench"])
def test_no_file_over_400_lines(folder):
    long = {str(f.relative_to(ROOT)): n for f in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("rel", PURE)
def test_core_math_does_no_file_io(rel):
    path = PKG / rel
    assert path.is_file(), f"{rel} is missing: update PURE in this test"
    bad = [f"{rel}:{line}: imports {name}" for line, name in imports(path) if name.split(".")[0] in FILE_IO]
    bad += [f"{rel}:{node.lineno}: calls open()" for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open"]
    assert not bad, "core math must be pure (no file I/O imports):\n" + "\n".join(bad)
