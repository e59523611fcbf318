"""The package's shape: dependencies point one way (no import cycles, function-level imports included)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(mod: str, f: Path, mods: dict[str, Path]) -> set[str]:
    """sidrec modules `mod` imports anywhere in its body (`from pkg import sub` names the submodule)."""
    names = []
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            names += [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = set()
    for n in names:
        while n and n not in mods:
            n = n.rpartition(".")[0]
        if n and n != mod:
            out.add(n)
    return out


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(m, f, mods) for m, f in mods.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path[path.index(n):] + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert "sidrec.run" in graph and "sidrec.train.config" in graph  # the walk saw the package


def _string_constants(f: Path) -> set[str]:
    """String constants of a module's code (docstrings and f-string text aside)."""
    tree = ast.parse(f.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs}


def test_only_the_run_package_names_run_files():
    """No module outside sidrec.run joins a run's file names to paths: they ask RunDir / PipelineDir /
    catalog. (The synthetic verification suite writes its own kind of directory, "verify", which
    happens to hold a verify.json and a report.md; io keeps the files that identify pre-marker
    directories.)"""
    from sidrec.run import layout

    names = {layout.CONFIG, layout.WEIGHTS, layout.STATE, layout.METRICS, layout.TIMINGS, *layout.EVALS,
             layout.JOINT_MIX, layout.VERIFY, layout.REPORT, layout.BENCH, layout.SUMMARY, layout.CURRENT,
             layout.CATALOG_INFO, layout.VECTORS}
    own_kinds = {"sidrec.verify.synthetic": {layout.VERIFY, layout.REPORT}, "sidrec.verify.report": {layout.REPORT},
                 "sidrec.io": {layout.CONFIG, layout.METRICS, layout.STATE, layout.REPORT, layout.SUMMARY}}
    offenders = {}
    roots = {SRC: "", SRC.parent / "bench": "bench."}
    for root, prefix in roots.items():
        for f in root.rglob("*.py"):
            parts = f.relative_to(root).with_suffix("").parts
            mod = prefix + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if mod.startswith("sidrec.run"):
                continue
            found = (_string_constants(f) & names) - own_kinds.get(mod, set())
            if found:
                offenders[mod] = sorted(found)
    assert not offenders, f"run file names outside sidrec.run: {offenders}"


def _is_head(node: ast.AST) -> bool:
    """`x.head`, `head`, `x.cfg.head` or `cfg["model"]["head"]`: an expression naming a model's head."""
    if isinstance(node, ast.Attribute):
        return node.attr == "head"
    if isinstance(node, ast.Name):
        return node.id == "head"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "head"
    return False


def test_no_switch_on_the_head_kind_outside_the_builders():
    """Beam search, ranking, serving, verify, training and `items add` ask the `Head` interface (and
    `model.head_kind` for a head name); only sidrec.model, which builds heads, looks at their kind."""
    offenders = []
    for mod, f in _modules().items():
        if mod == "sidrec.model" or mod.startswith("sidrec.model."):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                consts = [s for s in sides if isinstance(s, (ast.Tuple, ast.List, ast.Set))
                          or isinstance(s, ast.Constant) and s.value is not None]
                if any(_is_head(s) for s in sides) and consts:
                    offenders.append(f"{mod}:{node.lineno}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("hasattr", "getattr", "isinstance") and node.args and _is_head(node.args[0]):
                offenders.append(f"{mod}:{node.lineno}")
    assert not offenders, f"switches on the head's kind: {offenders}"
