"""The package layout stays acyclic: no import circle inside megadoc_jax (lazy imports inside functions
counted), and generation is the only side that imports the other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_files(package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of `package` (packages by their __init__)."""
    modules = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every import statement anywhere in the file, relative ones resolved.
    `from a import b` yields both a and a.b (b may be a module)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return names


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports. Importing one's own enclosing package
    (its __init__) is not an edge: Python has that package half-initialised already."""
    modules = module_files(package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for _, name in imported_names(module, path):
            while name and name not in modules:  # `from pkg.mod import function` -> pkg.mod
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                graph[module].add(name)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_megadoc_jax_has_no_import_circle():
    assert circles(import_graph("megadoc_jax")) == []


def test_megadoc_jax_never_imports_generation():
    offending = {
        f"{path.relative_to(ROOT)}:{line}"
        for module, path in module_files("megadoc_jax").items()
        for line, name in imported_names(module, path)
        if name == "generation" or name.startswith("generation.")
    }
    assert sorted(offending) == []


def test_the_checks_see_circles_and_lazy_imports(tmp_path, monkeypatch):
    """The checks themselves: a circle closed by an import inside a function is found."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from .a import thing\n")
    (package / "c.py").write_text("import pkg.a\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert circles(import_graph("pkg")) == [["pkg.a", "pkg.b"]]


# seqio and tensorflow are the `seqio` extra's: only megadoc_jax.seqio_interop may import them (docs/seqio.md).
SEQIO_ONLY = ("seqio", "tensorflow", "tensorflow_text", "tensorflow_datasets", "megadoc_jax.seqio_interop")


def test_only_the_seqio_interop_imports_seqio_or_tensorflow():
    offending = sorted(
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for package in ("megadoc_jax", "generation")
        for module, path in module_files(package).items()
        if not module.startswith("megadoc_jax.seqio_interop")
        for line, name in imported_names(module, path)
        if any(name == banned or name.startswith(banned + ".") for banned in SEQIO_ONLY)
    )
    assert offending == []


def test_training_and_evaluation_modules_load_no_seqio_or_tensorflow():
    """Run where seqio is installed too (tests_seqio/test_isolation.py): importing them loads neither."""
    import subprocess
    import sys

    code = (
        "import sys, megadoc_jax, megadoc_jax.train, megadoc_jax.evaluate, megadoc_jax.data.pipeline\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {SEQIO_ONLY[:4]!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
