"""Every public name is documented in the API reference; every example has a docs page."""

import inspect
import re
from pathlib import Path

import pyro_symmetry as ps

ROOT = Path(__file__).resolve().parents[1]


def _automodules() -> dict[str, set[str] | None]:
    """``module -> listed members`` (None: all public members) from docs/api.rst."""
    text = (ROOT / "docs" / "api.rst").read_text()
    out: dict[str, set[str] | None] = {}
    for m in re.finditer(r"\.\. automodule:: (\S+)\n((?:   :.*\n)*)", text):
        opts = m.group(2)
        if ":no-members:" in opts:
            continue
        listed = re.search(r":members:(.*)", opts)
        names = listed.group(1).strip() if listed else ""
        out[m.group(1)] = {n.strip() for n in names.split(",")} if names else None
    return out


def _public_objects():
    for namespace in (ps, ps.diagnostics, ps.diagnostics.metrics, ps.models):
        for name in namespace.__all__:
            obj = getattr(namespace, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue  # submodules and constants
            yield f"{namespace.__name__}.{name}", obj


def test_every_public_name_is_in_the_api_reference():
    documented = _automodules()
    missing = []
    for qualname, obj in _public_objects():
        module = getattr(obj, "__module__", None)
        name = getattr(obj, "__name__", qualname.rsplit(".", 1)[1])
        members = documented.get(module, "absent")
        if members == "absent" or (members is not None and name not in members):
            missing.append(f"{qualname} (defined in {module})")
        elif members is None:
            mod = inspect.getmodule(obj)
            if hasattr(mod, "__all__") and name not in mod.__all__:
                missing.append(f"{qualname} (not in {module}.__all__)")
    assert not missing, "public names missing from docs/api.rst: " + ", ".join(missing)


def test_every_example_has_a_docs_page_and_every_page_a_figure_or_table():
    pages = {p.stem for p in (ROOT / "docs" / "examples").glob("*.md")}
    scripts = {p.stem for p in (ROOT / "examples").glob("*.py")} - {"reproduce"}
    assert scripts <= pages, f"examples without a docs page: {sorted(scripts - pages)}"
    for page in pages:
        text = (ROOT / "docs" / "examples" / f"{page}.md").read_text()
        assert f"examples/{page}.py" in text, f"docs/examples/{page}.md does not show its command"
        assert "|" in text or "![" in text or "```text" in text, f"docs/examples/{page}.md shows no result"
