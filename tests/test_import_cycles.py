"""The house has no import cycles: a module never reaches back, directly or through others, into one that
imports it (every import counts, also those inside functions). A new cycle fails this test, naming it."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _graph(pkg: str = "distillery") -> dict[str, set[str]]:
    mods = {}
    for f in (SRC / pkg).rglob("*.py"):
        rel = f.relative_to(SRC).with_suffix("")
        is_pkg = rel.name == "__init__"
        mods[".".join(rel.parts[:-1] if is_pkg else rel.parts)] = (f, is_pkg)
    graph = {m: set() for m in mods}
    for name, (f, is_pkg) in mods.items():
        base = name if is_pkg else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")[:len(base.split(".")) - (node.level - 1)]
                    target = ".".join(parts + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            for t in found:
                # a module importing its own package's face is not a cycle of files
                if t in mods and t != name and not name.startswith(t + "."):
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = counter[0]
                counter[0] += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(graph[w]))))
            elif w in on:
                low[v] = min(low[v], index[w])

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return out


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_src():
    graph = _graph()
    assert len(graph) > 50  # the whole package was read
    assert _cycles(graph) == []
