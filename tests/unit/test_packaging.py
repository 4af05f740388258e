"""pyproject.toml lists the pack's packages by hand ([tool.setuptools] packages): a folder missing from the list
would be silently absent from an installed (non-editable) copy, and a listed one that is gone breaks the build."""
from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
NOT_PACK = {"tests", "bench", "docs", "workflows", "build", "dist"}


def listed_packages() -> set[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"humanref": "."}
    return set(setuptools["packages"])


def package_folders() -> set[str]:
    """Dotted names of every folder of the pack holding an __init__.py (the root is ``humanref``)."""
    found = set()
    for init in REPO.rglob("__init__.py"):
        rel = init.parent.relative_to(REPO)
        if rel.parts and (rel.parts[0] in NOT_PACK or any(p.startswith(".") or p.endswith(".egg-info")
                                                           for p in rel.parts)):
            continue
        found.add(".".join(("humanref", *rel.parts)))
    return found


def test_every_package_folder_is_listed_in_pyproject():
    folders = package_folders()
    assert {"humanref", "humanref.attention", "humanref.pipelines.references"} <= folders
    assert not folders - listed_packages(), "add to [tool.setuptools] packages in pyproject.toml"
    assert not listed_packages() - folders, "listed in [tool.setuptools] packages but no such folder"
