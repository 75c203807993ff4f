"""The README's module table is the map of ``gateway/``: every module is on it, and nothing
that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gateway"


def table_names() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("| module | stage |")
    table = readme[start : readme.index("\n\n", start)]
    # The first cell of each row: `a.py`, `b.py` or `package/`; files inside a package are
    # named in the second cell.
    cells = [row.split("|")[1] for row in table.splitlines()[2:]]
    return {name for cell in cells for name in re.findall(r"`([\w/.]+)`", cell)}


def test_the_module_table_lists_every_module_of_the_package_and_only_those() -> None:
    on_disk = {p.name for p in PACKAGE.glob("*.py") if not p.name.startswith("__")}
    on_disk |= {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert table_names() == on_disk


def test_every_module_a_package_row_names_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    for package in (p for p in PACKAGE.iterdir() if (p / "__init__.py").exists()):
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{package.name}/`"))
        for name in re.findall(r"`([\w]+\.py)`", row):
            assert (package / name).exists(), (package.name, name)
