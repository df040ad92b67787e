"""The shape of the code, read from the source (ast): layers and their imports, function length, private names.

The layers (README, "Layout"): ``base`` imports no package of the toolkit;
the libraries (``eval_lfw``, ``finetune``, ``prune``, ``prototxt``) import
``base`` and each other one way only, never an app; the ``apps`` sit on top.
The README's Layout table says which packages each one imports, and must
say exactly what the code does.
"""
import ast
import os
import re

import pytest

from conftest import ROOT

PACKAGES = ("base", "runtimes", "eval_lfw", "finetune", "prune", "prototxt", "apps")
LIBRARIES = ("runtimes", "eval_lfw", "finetune", "prune", "prototxt")
MAX_LINES = 80


def python_files(*folders):
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in sorted(filenames):
                if name.endswith(".py"):
                    yield os.path.join(dirpath, name)


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def imports(path):
    """[(imported module, names, line)] of a file, relative imports resolved, function-level ones included."""
    tree = ast.parse(open(path).read(), path)
    here = module_name(path).split(".")
    if not path.endswith("__init__.py"):
        here = here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]   # names: (name, local name) pairs
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.append((module, [(a.name, a.asname or a.name) for a in node.names], node.lineno))
    return out


def package_edges():
    """{package: {package it imports: [file:line, ...]}} over the toolkit's packages."""
    edges = {p: {} for p in PACKAGES}
    for pkg in PACKAGES:
        for path in python_files(pkg):
            for module, _, line in imports(path):
                top = module.split(".")[0]
                if top in PACKAGES and top != pkg:
                    edges[pkg].setdefault(top, []).append("%s:%d" % (os.path.relpath(path, ROOT), line))
    return edges


def cycles(edges):
    """Every cycle of the package graph, as a list of packages."""
    found = []

    def visit(node, path):
        for nxt in edges.get(node, {}):
            if nxt in path:
                found.append(path[path.index(nxt):] + [nxt])
            else:
                visit(nxt, path + [nxt])
    for start in edges:
        visit(start, [start])
    return found


def module_edges():
    """{module: set of toolkit modules it imports} over every file of the packages, function-level imports
    included; ``from pkg import sub`` is an edge to the module ``pkg.sub`` when there is one."""
    paths = {module_name(p): p for p in python_files(*PACKAGES)}
    edges = {}
    for name, path in paths.items():
        targets = set()
        for module, names, _ in imports(path):
            subs = {module + "." + n for n, _ in names if module + "." + n in paths}
            targets |= subs if subs else {module} & set(paths)
        edges[name] = targets - {name}
    return edges


def circles(edges):
    """The strongly connected parts of more than one node (Tarjan): every import circle, each sorted."""
    index, low, stack, found = {}, {}, [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = stack[stack.index(node):]
            del stack[stack.index(node):]
            if len(part) > 1:
                found.append(sorted(part))
    for node in edges:
        if node not in index:
            visit(node)
    return found


def readme_layout():
    """{package: (layer, set of packages it imports)} from the README's Layout table."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    table = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        m = re.fullmatch(r"`(\w+)/`", cells[0]) if len(cells) >= 4 else None
        if m and cells[1] in ("base", "library", "apps"):
            table[m.group(1)] = (cells[1], {c.strip("` ") for c in cells[3].split(",") if c.strip() != "none"})
    return table


def test_packages_form_layers_without_cycles():
    edges = package_edges()
    assert cycles(edges) == [], "import cycles between packages: %s" % cycles(edges)
    assert edges["base"] == {}, "base imports a package of the toolkit: %s" % edges["base"]
    for lib in LIBRARIES:
        assert "apps" not in edges[lib], "library %s imports an app: %s" % (lib, edges[lib]["apps"])


def test_no_file_level_import_circle():
    """Not even inside a package (base included), not even through an import inside a function."""
    edges = module_edges()
    assert "base.caffe_io" in edges["base.runfolder"] and "base.errors" in edges["base.cli"]   # the graph is read
    assert circles(edges) == []


@pytest.mark.parametrize("graph, found", [({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
                                          ({"a": {"b"}, "b": set(), "c": {"b"}}, [])])
def test_the_circle_finder_finds_circles(graph, found):
    assert circles(graph) == found


def test_the_readme_layout_table_is_the_import_graph():
    table = readme_layout()
    real = {p for p in PACKAGES if os.path.exists(os.path.join(ROOT, p, "__init__.py"))}
    on_disk = {d for d in os.listdir(ROOT) if os.path.exists(os.path.join(ROOT, d, "__init__.py"))}
    assert on_disk == real == set(PACKAGES)
    assert set(table) == real, "README Layout table lists %s, the tree has %s" % (sorted(table), sorted(real))
    edges = package_edges()
    for pkg in PACKAGES:
        layer, imported = table[pkg]
        assert layer == ("base" if pkg == "base" else "library" if pkg in LIBRARIES else "apps"), pkg
        assert set(edges[pkg]) == imported, "README says %s imports %s; the code: %s" % (
            pkg, sorted(imported), {k: v[:2] for k, v in edges[pkg].items()})


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in python_files(*PACKAGES, "tests", "benchmarks", "scripts"):
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append("%s:%d %s (%d lines)" % (os.path.relpath(path, ROOT), node.lineno, node.name, n))
    assert long == []


def test_no_private_name_is_used_across_modules():
    """``from x import _y`` and ``x._y`` on a toolkit module are both a private name used from outside."""
    found = []
    for path in python_files(*PACKAGES, "tests", "benchmarks"):
        tree = ast.parse(open(path).read(), path)
        modules = {}
        for module, names, line in imports(path):
            if module.split(".")[0] not in PACKAGES:
                continue
            found += ["%s:%d imports %s.%s" % (os.path.relpath(path, ROOT), line, module, n)
                      for n, _ in names if n.startswith("_") and not n.startswith("__")]
            modules.update({local: module for _, local in names} if names else {module.split(".")[0]: module})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append("%s:%d uses %s.%s" % (os.path.relpath(path, ROOT), node.lineno, node.value.id, node.attr))
    assert found == []


@pytest.mark.parametrize("graph, cycle", [({"a": {"b": 1}, "b": {"a": 1}}, True), ({"a": {"b": 1}, "b": {}}, False)])
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert bool(cycles(graph)) == cycle
