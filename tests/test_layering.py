"""The package's architecture, checked from source: one layer order, no import cycles, small files.

Every module of ``ds_hexamoe`` (with ``kernels/`` and ``patches/`` under the names they install as) is
parsed; every import of a package module counts, also one inside a function: a lazy import that dodges a
cycle is still an edge. The layer order is the one ``docs/design.md`` documents.

The scripts in ``scripts/`` are held to the same size caps, may not import each other in a cycle (a script
importing another by module name, ``import bench_common`` or ``from bench_hetero import ...``, is an edge),
and no package module may import a script.
"""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ds_hexamoe"
# installed name -> source folder (setup.py maps the two top-level folders into the package)
SOURCES = {PACKAGE: ROOT / "ds_hexamoe", f"{PACKAGE}.kernels": ROOT / "kernels", f"{PACKAGE}.patches": ROOT / "patches"}

# Lowest first. A module may import modules of its own layer (no cycles) or of lower layers only.
LAYERS: list[tuple[str, list[str]]] = [
    ("ground", ["config", "_import_hooks", "distributed", "atomic", "apportion", "devices", "errors", "jsonfile"]),
    ("ops", ["ops", "kernels"]),
    ("experts", ["experts"]),
    ("layers", ["layers", "models"]),
    ("parallel", ["parallel"]),
    ("fssdp", ["fssdp"]),
    ("placement", ["placement"]),
    ("runtime", ["runtime", "hetero"]),
    ("integrations", ["integrations", "patches", "callbacks", "testing"]),
    ("recipes", ["recipes"]),
    ("tasks", ["tasks"]),
    ("worker", ["worker"]),
    ("cli", ["cli", "train", "__main__", ""]),  # "": the package root, the public facade
]
# placement is the planner: pure numpy/scipy, usable without a training stack
PLACEMENT_FORBIDDEN = ("torch", "transformers", "deepspeed", "megatron")
SCRIPTS = ROOT / "scripts"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for name, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = path
    return out


MODULES = _modules()
SCRIPT_FILES = {p.stem: p for p in sorted(SCRIPTS.glob("*.py"))}  # module name -> file


def _is_package(mod: str) -> bool:
    return MODULES.get(mod, Path()).name == "__init__.py"


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if _is_package(mod) else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str) -> list[tuple[str, int, set[str]]]:
    """``(target module, line, names)`` for every package import in ``mod``, nested ones included."""
    tree = ast.parse(MODULES[mod].read_text(), filename=str(MODULES[mod]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, node.lineno, set()))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(mod, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, node.lineno, {alias.name}))
    return found


def _internal(target: str) -> str | None:
    """The package module an import names (``a.b.c`` of ``import a.b.c.d`` when only ``a.b.c`` exists)."""
    parts = target.split(".")
    while parts:
        name = ".".join(parts)
        if name in MODULES:
            return name
        parts.pop()
    return None


def layer_of(mod: str) -> int:
    rest = mod[len(PACKAGE) + 1:] if mod != PACKAGE else ""
    head = rest.split(".")[0]
    for rank, (_, heads) in enumerate(LAYERS):
        if head in heads:
            return rank
    raise AssertionError(f"{mod}: its top-level name {head!r} has no layer; add it to LAYERS and docs/design.md")


def edges() -> dict[str, list[tuple[str, int]]]:
    graph: dict[str, list[tuple[str, int]]] = {m: [] for m in MODULES}
    for mod in MODULES:
        for target, line, _ in _imports(mod):
            dep = _internal(target)
            if dep is not None and dep != mod:
                graph[mod].append((dep, line))
    return graph


def _where(mod: str, line: int) -> str:
    return f"{MODULES[mod].relative_to(ROOT)}:{line}"


def test_every_module_has_a_layer():
    for mod in MODULES:
        layer_of(mod)


def test_imports_follow_the_layer_order():
    bad = []
    for mod, deps in edges().items():
        for dep, line in deps:
            if layer_of(dep) > layer_of(mod):
                bad.append(f"{_where(mod, line)}: {mod} ({LAYERS[layer_of(mod)][0]}) imports {dep} "
                           f"({LAYERS[layer_of(dep)][0]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan): every import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def _cycle_report(all_edges: dict, where) -> str:
    """Every import cycle among ``all_edges`` (``{module: [(target, line)]}``) with the imports that close it,
    ``where(module, line)`` naming each; "" when there is none."""
    lines = []
    for comp in _cycles({m: sorted({d for d, _ in deps}) for m, deps in all_edges.items()}):
        members = set(comp)
        inner = [f"  {where(m, line)}: {m} -> {d}" for m in comp for d, line in all_edges[m] if d in members]
        lines.append("cycle among " + ", ".join(comp) + ":\n" + "\n".join(inner))
    return "\n".join(lines)


def test_no_import_cycles():
    report = _cycle_report(edges(), _where)
    assert not report, report


def test_placement_is_pure():
    bad = []
    for mod in MODULES:
        if not mod.startswith(f"{PACKAGE}.placement"):
            continue
        for target, line, _ in _imports(mod):
            if target.split(".")[0] in PLACEMENT_FORBIDDEN:
                bad.append(f"{_where(mod, line)}: {mod} imports {target}")
    assert not bad, "placement must stay numpy/scipy only:\n" + "\n".join(bad)


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def size_report() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """``(lines, file)`` of every package module and script, and ``(lines, "file:line name")`` of every
    function in them (nested ones too), longest first."""
    files, funcs = [], []
    for path in list(MODULES.values()) + list(SCRIPT_FILES.values()):
        src = path.read_text()
        files.append((len(src.splitlines()), str(path.relative_to(ROOT))))
        for fn in _functions(ast.parse(src)):
            funcs.append((fn.end_lineno - fn.lineno + 1, f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}"))
    return sorted(files, reverse=True), sorted(funcs, reverse=True)


def test_files_and_functions_stay_small():
    files, funcs = size_report()
    big_files = [f"{path}: {n} lines" for n, path in files if n > MAX_FILE_LINES]
    big_funcs = [f"{where}: {n} lines" for n, where in funcs if n > MAX_FUNCTION_LINES]
    assert not big_files and not big_funcs, (
        f"files over {MAX_FILE_LINES} lines:\n" + "\n".join(big_files)
        + f"\nfunctions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(big_funcs))


# ----------------------------------------------------------------------------- scripts/
def _top_level_imports(path: Path) -> list[tuple[str, int]]:
    """``(top-level module name, line)`` of every absolute import in ``path``, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno))
    return found


def script_edges() -> dict[str, list[tuple[str, int]]]:
    """Script -> the other scripts it imports by module name, with the line."""
    return {name: [(dep, line) for dep, line in _top_level_imports(path) if dep in SCRIPT_FILES and dep != name]
            for name, path in SCRIPT_FILES.items()}


def test_no_import_cycles_among_scripts():
    report = _cycle_report(script_edges(), lambda m, line: f"{SCRIPT_FILES[m].relative_to(ROOT)}:{line}")
    assert not report, report


def test_no_package_module_imports_a_script():
    bad = [f"{_where(mod, line)}: {mod} imports the script {name}"
           for mod, path in MODULES.items() for name, line in _top_level_imports(path) if name in SCRIPT_FILES]
    assert not bad, "the package must not depend on scripts/:\n" + "\n".join(bad)


def test_the_script_checks_see_the_scripts():
    """The checks above look at real files: the benchmark scripts are found, and one known edge is seen."""
    assert {"bench_hetero", "bench_validate", "bench_papers", "paper_setups"} <= set(SCRIPT_FILES)
    assert ("paper_setups" in {d for d, _ in script_edges()["bench_papers"]})


# a cited markdown file ("docs/design.md", "recipes.md") or a path that climbs out of its folder ("../x")
_MD_REF = re.compile(r"[\w./-]*\w\.md\b")
_UP_REF = re.compile(r"(?<![\w.])\.\./[\w.-]+")


def _resolves(ref: str, source: Path) -> bool:
    """A cited file exists in the repository: relative to the root, the citing file or docs/."""
    for base in (ROOT, source.parent, ROOT / "docs"):
        if _inside(base / ref):
            return True
    return False


def _inside(target: Path) -> bool:
    target = target.resolve()
    return target.is_relative_to(ROOT) and target.exists()


def test_nothing_refers_outside_the_repository():
    """Every markdown file the package, scripts and docs cite exists in the repository (docs/design.md is the
    architecture's home), and every ``../`` path they give leads to something inside it."""
    bad = []
    for path in list(ROOT.glob("ds_hexamoe/**/*.py")) + list(ROOT.glob("kernels/*.py")) + list(ROOT.glob("patches/*.py")) \
            + list(ROOT.glob("docs/*.md")) + [ROOT / "README.md"] + list(ROOT.glob("scripts/*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            refs = [r for r in _MD_REF.findall(line) if not _resolves(r, path)]
            refs += [r for r in _UP_REF.findall(line) if not _inside(path.parent / r)]
            if refs:
                bad.append(f"{path.relative_to(ROOT)}:{i}: {', '.join(refs)}: {line.strip()}")
    assert not bad, "references to files outside the repository:\n" + "\n".join(bad)


if __name__ == "__main__":  # prints the longest files and functions (the closing note lists them)
    files, funcs = size_report()
    print("longest files:", *[f"  {n:4d} {p}" for n, p in files[:5]], sep="\n")
    print("longest functions:", *[f"  {n:4d} {w}" for n, w in funcs[:5]], sep="\n")
    os.sys.exit(0)
