"""The package's architecture rules (``docs/architecture.md``), read from the source with ``ast``.

(a) **Layering**: dependencies point one way, down the table of ``docs/architecture.md``; a
module never imports a layer above its own. The few upward imports that exist are lazy
(inside a function, so importing the lower layer does not import the higher one) and are
listed in ``UPWARD_EXCEPTIONS`` with the reason; the test checks each is still lazy and
still exists, so the list can only shrink.

(b) **The group-action boundary**: outside ``pyro_symmetry/groups/`` no module reads how a
group acts on a site through the raw data model (``NeuronGroup.incoming/outgoing``,
``spec.site_moves``, the ``activation_symmetry`` string) or imports a private name of
``groups``; they use ``spec.action(site)`` (``SiteAction``), ``spec.rescale`` and
``group.signed/scalable/roles()``. Files still being migrated are in ``KNOWN_VIOLATIONS``
(file -> reason), checked not to be stale.

Building groups with the constructor's keywords (``NeuronGroup(n, incoming=[...])``) is
not a violation: that is the public way to declare a spec.
"""

from __future__ import annotations

import ast
import functools
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "pyro_symmetry"

# Bottom to top, as in docs/architecture.md ("posterior" is the posteriors/ package and the
# posterior.py module that re-exports it; "_runs" and "_executors" are private helpers of
# training and collections that import only _state or nothing; the package root and
# ``testing`` (helpers for users' tests) sit on top). A new top-level module must be added.
LAYERS: list[set[str]] = [
    {"_validation", "_state", "_shapes", "_runs", "_executors"},
    {"groups"},
    {"models"},
    {"posterior", "posteriors"},
    {"scaling"},
    {"alignment"},
    {"estimators"},
    {"distributions"},
    {"guides"},
    {"training"},
    {"collections"},
    {"diagnostics"},
    {"testing", "<root>"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}

# (importing file, imported layer) -> why it is allowed. Each must be a lazy import (inside a
# function); the test fails if one disappears, so remove it from the list when it does.
UPWARD_EXCEPTIONS = {
    (
        "pyro_symmetry/_validation.py",
        "groups",
    ): "check_spec/SpecError: the error class lives in groups.spec, which itself uses _validation",
    (
        "pyro_symmetry/scaling/canonical.py",
        "alignment",
    ): "canonicalize(permutation='align') aligns the samples (align_samples) after min-mass",
    (
        "pyro_symmetry/posteriors/reading.py",
        "estimators",
    ): "reading a Symmetrized/Pushforward distribution detaches it with the estimators' helper",
}

BANNED_ATTRIBUTES = {"incoming", "outgoing", "site_moves", "activation_symmetry"}

# file -> reason. Only files still being migrated to spec.action by another change; the
# list can only shrink (the test fails on an entry without a violation).
KNOWN_VIOLATIONS: dict[str, str] = {}


def _rel(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


@functools.cache
def _sources() -> dict[str, ast.Module]:
    return {_rel(p): ast.parse(p.read_text(), filename=str(p)) for p in sorted(PKG.rglob("*.py"))}


def _module_name(rel: str) -> tuple[str, str]:
    """``(dotted module name, the package its relative imports start from)``."""
    parts = rel[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _layer(dotted: str) -> str:
    """The layer of a module of the package: its first component below ``pyro_symmetry``."""
    parts = dotted.split(".")
    if len(parts) == 1:
        return "<root>"
    return parts[1] if parts[1] in LEVEL else "<root>"  # ``from pyro_symmetry import align``: the root


def _lazy_nodes(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside a function or an ``if TYPE_CHECKING:`` block."""
    lazy: set[int] = set()
    for node in ast.walk(tree):
        inner = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
            isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        )
        if inner:
            lazy.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return lazy


def _imports(rel: str) -> list[tuple[str, list[str], int, bool]]:
    """``(imported module, imported names, line, lazy)`` for every import of the package."""
    tree = _sources()[rel]
    _, package = _module_name(rel)
    lazy = _lazy_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            if node.module is None:  # ``from .. import groups``: each name may be a module
                for name in names:
                    out.append((f"{target}.{name}", [], node.lineno, id(node) in lazy))
            else:
                out.append((target, names, node.lineno, id(node) in lazy))
        elif isinstance(node, ast.Import):
            for a in node.names:
                out.append((a.name, [], node.lineno, id(node) in lazy))
    return [o for o in out if o[0] == "pyro_symmetry" or o[0].startswith("pyro_symmetry.")]


def _upward_imports() -> dict[tuple[str, str], list[tuple[int, bool]]]:
    found: dict[tuple[str, str], list[tuple[int, bool]]] = {}
    for rel in _sources():
        own = _layer(_module_name(rel)[0])
        for target, _, line, lazy in _imports(rel):
            other = _layer(target)
            if LEVEL[other] > LEVEL[own]:
                found.setdefault((rel, other), []).append((line, lazy))
    return found


def _boundary_violations(rel: str) -> list[str]:
    """What ``rel`` does across the group-action boundary (empty: nothing)."""
    out = []
    for node in ast.walk(_sources()[rel]):
        if isinstance(node, ast.Attribute) and node.attr in BANNED_ATTRIBUTES:
            out.append(f"line {node.lineno}: .{node.attr}")
    for target, names, line, _ in _imports(rel):
        parts = target.split(".")
        if len(parts) >= 2 and parts[1] == "groups":
            private = [p for p in parts[2:] if p.startswith("_")] + [n for n in names if n.startswith("_")]
            if private:
                out.append(f"line {line}: imports {target} {private}")
    return out


def test_every_package_module_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in PKG.iterdir() if not p.name.startswith((".", "__"))}
    tops = {t for t in tops if (PKG / t).is_dir() or (PKG / f"{t}.py").is_file()}
    missing = tops - set(LEVEL)
    assert not missing, f"modules with no layer in LAYERS (add them, as in docs/architecture.md): {missing}"


def test_no_layer_imports_a_layer_above_it():
    found = _upward_imports()
    bad = {k: v for k, v in found.items() if k not in UPWARD_EXCEPTIONS}
    assert not bad, "upward imports (a lower layer importing a higher one, see docs/architecture.md): " + "; ".join(
        f"{f} imports {layer} (lines {[ln for ln, _ in v]})" for (f, layer), v in bad.items()
    )
    for key, reason in UPWARD_EXCEPTIONS.items():
        assert key in found, f"stale exception {key} ({reason}): the import is gone, remove it from UPWARD_EXCEPTIONS"
        eager = [ln for ln, lazy in found[key] if not lazy]
        assert not eager, f"{key[0]} imports {key[1]} at import time (lines {eager}): it must stay inside a function"


def test_the_layer_table_matches_the_docs():
    """The layers listed here are the ones docs/architecture.md lists, in the same order."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    documented = [row.split("`")[1].strip("/") for row in rows]
    ours = [name for names in reversed(LAYERS) for name in sorted(names)]
    ours = [n for n in ours if n in documented]
    assert ours == [n for n in documented if n in ours]
    assert {"diagnostics", "groups", "scaling", "alignment", "estimators", "guides", "_validation"} <= set(ours)


def test_the_layering_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker is not vacuous: an eager ``from ..alignment import align`` in groups/ is caught."""
    tree = ast.parse("from ..alignment import align\n\ndef f():\n    from ..diagnostics import report\n")
    monkeypatch.setitem(_sources(), "pyro_symmetry/groups/_fake.py", tree)
    found = _upward_imports()
    assert found[("pyro_symmetry/groups/_fake.py", "alignment")] == [(1, False)]
    assert found[("pyro_symmetry/groups/_fake.py", "diagnostics")] == [(4, True)]


def test_the_boundary_check_sees_violations(monkeypatch):
    src = (
        "from ..groups._indexing import gather_axes\n"
        "from ..groups import _layout, PermutationSpec\n"
        "import pyro_symmetry.groups._ops\n"
        "x = g.incoming + g.outgoing\n"
        "n = spec.site_moves(s)[0]\n"
        "ok = NeuronGroup(3, incoming=[('a', 0)], activation_symmetry='scale')\n"
        "bad = g.activation_symmetry == 'sign'\n"
    )
    monkeypatch.setitem(_sources(), "pyro_symmetry/scaling/_fake.py", ast.parse(src))
    found = _boundary_violations("pyro_symmetry/scaling/_fake.py")
    assert sorted(f.split(":")[0] for f in found) == sorted(
        ["line 1", "line 2", "line 3", "line 4", "line 4", "line 5", "line 7"]
    ), found


@pytest.mark.parametrize("rel", sorted(r for r in _sources() if not r.startswith("pyro_symmetry/groups/")))
def test_no_module_outside_groups_reads_the_raw_group_data_model(rel):
    found = _boundary_violations(rel)
    if rel in KNOWN_VIOLATIONS:
        assert found, f"{rel} no longer crosses the boundary: remove it from KNOWN_VIOLATIONS"
        return
    assert not found, (
        f"{rel} reads the raw group data model ({'; '.join(found)}): use spec.action(site) (SiteAction: apply, "
        "blocks, unit_blocks, scale, axis_groups, spans_of), spec.rescale/sign_element/unit_shape/"
        "moving_elements/children/top_level and group.signed/scalable/roles()"
    )


def test_known_violations_are_real_files():
    for rel in KNOWN_VIOLATIONS:
        assert rel in _sources(), f"KNOWN_VIOLATIONS lists {rel}, which does not exist"
