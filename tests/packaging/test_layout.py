"""The package layout and the rules that keep it simple (docs/ARCHITECTURE.md), checked on the source.

Every import of every module is read with ``ast`` (module-level and function-level alike, since a lazy
import is still a dependency) and resolved to the project module it names. The graph must have no
cycle; the layers may only point down (kernels ← model ← trainer; data_pipelines beside, reaching only
itself); no module imports another module's private name; nothing anywhere imports the pre-namespace
top-level names (``model``, ``kernels``, ``trainer``, ``data_pipelines``).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
OLD_TOP_LEVEL = ("model", "kernels", "trainer", "data_pipelines")


def _source_modules() -> dict[str, Path]:
    """Every module of the installed namespace: dotted name → file (package ``__init__`` as the package)."""
    mods: dict[str, Path] = {}
    for pkg, folder in PACKAGE_DIR.items():
        root = REPO / folder
        for f in root.rglob("*.py"):
            rel = f.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([pkg, *parts]) if parts else pkg
            if name in mods:  # a nested package_dir entry covers it already
                continue
            mods[name] = f
    return mods


MODULES = _source_modules()


def _package_of(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module as written but absolute, imported names, line) for every import in ``name``."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(name).split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, [a.name for a in node.names], node.lineno))
    return out


def _edges(name: str) -> list[tuple[str, int, list[str]]]:
    """Project modules ``name`` depends on: (target module, line, names taken from it)."""
    edges = []
    for mod, names, line in _imports(name):
        if not (mod == "tandem" or mod.startswith("tandem.")):
            continue
        # `from pkg import sub` names a submodule when pkg.sub is one; otherwise the names live in pkg
        subs = [n for n in names if f"{mod}.{n}" in MODULES]
        for n in subs:
            edges.append((f"{mod}.{n}", line, []))
        rest = [n for n in names if f"{mod}.{n}" not in MODULES]
        if rest or not names:
            assert mod in MODULES, f"{MODULES[name]}:{line}: imports {mod}, which is not a tandem module"
            edges.append((mod, line, rest))
    return edges


GRAPH = {m: _edges(m) for m in MODULES}


def test_every_package_folder_is_installed():
    """A package folder missing from pyproject's ``packages`` would be absent from the wheel."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {m for m, f in MODULES.items() if f.name == "__init__.py"}
    assert on_disk == listed, {"missing from pyproject": sorted(on_disk - listed), "not on disk": sorted(listed - on_disk)}
    assert set(PACKAGE_DIR) == {"tandem", "tandem.model", "tandem.kernels", "tandem.trainer", "tandem.data_pipelines",
                                "tandem.recipes"}


def test_import_graph_has_no_cycle():
    """Tarjan's strongly connected components over every import; any component of two or more is a cycle."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


# What each layer may import from the project (besides itself).
ALLOWED = {
    "tandem.kernels": set(),
    "tandem.model": {"tandem.kernels"},
    "tandem.data_pipelines": set(),
    "tandem.recipes": set(),
    "tandem.trainer": {"tandem.kernels", "tandem.model", "tandem.data_pipelines", "tandem.recipes"},
}


def _layer(name: str) -> str:
    return ".".join(name.split(".")[:2])


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_point_down(layer):
    bad = [f"{MODULES[m].relative_to(REPO)}:{line}: imports {t}"
           for m, edges in GRAPH.items() if _layer(m) == layer
           for t, line, _ in edges if _layer(t) != layer and _layer(t) not in ALLOWED[layer]]
    assert not bad, "\n".join(bad)


def test_model_and_kernels_never_see_a_process_group():
    bad = [f"{MODULES[m].relative_to(REPO)}:{line}: imports {mod}"
           for m in MODULES if _layer(m) in ("tandem.model", "tandem.kernels")
           for mod, names, line in _imports(m)
           if mod.startswith("torch.distributed") or (mod == "torch" and "distributed" in names)
           or mod.startswith(("deepspeed", "megatron"))]
    assert not bad, "\n".join(bad)


def test_no_private_name_imported_from_another_module():
    bad = [f"{MODULES[m].relative_to(REPO)}:{line}: takes {n} from {t}"
           for m, edges in GRAPH.items() for t, line, names in edges for n in names
           if n.startswith("_") and not n.startswith("__")]
    bad += [f"{MODULES[m].relative_to(REPO)}:{line}: imports private module {t}"
            for m, edges in GRAPH.items() for t, line, _ in edges if any(p.startswith("_") and not p.startswith("__")
                                                                          for p in t.split("."))]
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_old_top_level_names():
    """Tests, benchmarks and scripts too: only ``tandem.*`` exists once installed."""
    bad = []
    for f in sorted(REPO.rglob("*.py")):
        if any(part.startswith(".") or part in ("build", "runs", "outputs") for part in f.relative_to(REPO).parts):
            continue
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                mods = [node.module]
            bad += [f"{f.relative_to(REPO)}:{node.lineno}: {m}" for m in mods if m.split(".")[0] in OLD_TOP_LEVEL]
    assert not bad, "\n".join(bad)
