"""Module boundaries that keep DualPath deployable and upgradable, checked on the source.

- Only ``dualpath.store`` knows the store's private names (its file formats): every other module, the
  router above all, goes through the store's published interface (``StoreIndex``, ``NodeReader``, ...).
- Only ``dualpath.srt.surface`` names SGLang: a new SGLang version means editing that one module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "dualpath"
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "vllm_standin" not in p.parts)


def _module(path: Path) -> str:
    return ".".join(("dualpath", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def private_store_uses(source: str) -> list[str]:
    """Private names of ``dualpath.store`` that ``source`` imports or reads off an imported store module."""
    tree = ast.parse(source)
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dualpath.store"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{node.module}.{alias.name}")
                elif alias.name[:1].islower():  # maybe a submodule: from dualpath.store import node
                    aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module == "dualpath":
            aliases |= {alias.asname or alias.name for alias in node.names if alias.name == "store"}
        elif isinstance(node, ast.Import):
            aliases |= {alias.asname for alias in node.names
                        if alias.name.startswith("dualpath.store") and alias.asname}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in aliases):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def sglang_imports(source: str) -> list[str]:
    """Modules of SGLang that ``source`` imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
            [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
        found += [name for name in names if name == "sglang" or name.startswith("sglang.")]
    return found


def test_the_checkers_catch_what_they_look_for() -> None:  # negative controls: each check can fail
    assert private_store_uses("from dualpath.store.node import _FILE_BYTES, NodeReader") == [
        "dualpath.store.node._FILE_BYTES"]
    assert private_store_uses("from dualpath.store import node\nx = node._HEADER") == ["node._HEADER"]
    assert private_store_uses("import dualpath.store.index as ix\nix._entry()") == ["ix._entry"]
    assert private_store_uses("from dualpath.store import StoreIndex, node_dir\nStoreIndex(x)._cache") == []
    assert sglang_imports("from sglang.srt.managers.scheduler import Scheduler\nimport sglang_router") == [
        "sglang.srt.managers.scheduler"]
    assert sglang_imports("import sglang") == ["sglang"]


def test_no_module_outside_the_store_uses_its_private_names() -> None:
    outside = [p for p in SOURCES if not _module(p).startswith("dualpath.store")]
    uses = {_module(p): private_store_uses(p.read_text()) for p in outside}
    assert len(uses) > 50 and "dualpath.router.store_view" in uses
    assert {module: names for module, names in uses.items() if names} == {}


def test_only_the_srt_surface_imports_sglang() -> None:
    imports = {_module(p): sglang_imports(p.read_text()) for p in SOURCES}
    assert imports.pop("dualpath.srt.surface") == []  # it resolves dotted paths at run time
    assert {module: names for module, names in imports.items() if names} == {}
