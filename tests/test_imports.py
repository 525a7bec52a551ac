"""Import rules, checked on the source with ``ast`` (nothing is imported):

- the data owner's side (``pema/adapter/``) never imports the PLM owner's package ``pema.owner``;
- only ``pema/integrations/`` imports Ray or MLflow, not even inside a function elsewhere, and no core module
  imports ``pema.integrations``;
- the core math modules import nothing that does file I/O.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pema"
PURE = ["keys.py", "adapter/losses.py", "adapter/schedule.py", "adapter/model.py", "adapter/head.py",
        "adapter/phases.py", "baselines/knn.py"]
FILE_IO = {"os", "pathlib", "json", "pyarrow", "safetensors"}


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


def violations(files, is_forbidden) -> list[str]:
    return [f"{f.relative_to(PKG.parent)}:{line}: imports {name}"
            for f in files for line, name in imports(f) if is_forbidden(name)]


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_checker_sees_every_import_form(tmp_path):
    # guard the checker itself: each of these must be seen as an import of pema.owner
    probe = tmp_path / "probe.py"
    probe.write_text("import pema.owner\nfrom pema.owner.plm import x\nfrom pema import owner\n"
                     "from ..owner import y\nfrom .. import owner\ndef f():\n    import pema.owner.encode\n")
    found = imports(probe, module="pema.adapter.probe")
    assert [line for line, _ in found] == [1, 2, 3, 4, 5, 7]
    assert all(under(name, "pema.owner") for _, name in found), found
    assert not under("pema.ownership", "pema.owner")


def test_adapter_never_imports_owner():
    files = sorted((PKG / "adapter").rglob("*.py"))
    assert files, "no adapter sources found"
    bad = violations(files, lambda n: under(n, "pema.owner"))
    assert not bad, "pema.adapter must not import pema.owner:\n" + "\n".join(bad)


def core_files() -> list[Path]:
    return sorted(f for f in PKG.rglob("*.py") if "integrations" not in f.relative_to(PKG).parts)


def test_no_ray_or_mlflow_in_core():
    files = core_files()
    assert len(files) > 10 and (PKG / "integrations").is_dir()
    bad = violations(files, lambda n: n.split(".")[0] in {"ray", "mlflow"})
    assert not bad, "only pema.integrations may import ray/mlflow:\n" + "\n".join(bad)


def test_core_never_imports_integrations():
    bad = violations(core_files(), lambda n: under(n, "pema.integrations"))
    assert not bad, "core modules must not import pema.integrations:\n" + "\n".join(bad)


@pytest.mark.parametrize("rel", PURE)
def test_core_math_does_no_file_io(rel):
    path = PKG / rel
    assert path.is_file(), f"{rel} is missing: update PURE in this test"
    bad = violations([path], lambda n: n.split(".")[0] in FILE_IO)
    bad += [f"{rel}:{node.lineno}: calls open()" for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open"]
    assert not bad, "core math must be pure (no file I/O imports):\n" + "\n".join(bad)
