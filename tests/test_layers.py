"""The package's layers (`.importlinter`, docs/architecture.md): a module imports only from the
layers below its own, so the folders read bottom to top and no import cycle crosses a layer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_layers_contract_is_kept():
    pytest.importorskip("importlinter", reason="import-linter comes with the dev extra")
    proc = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", "--config", str(ROOT / ".importlinter")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_every_module_of_the_package_has_a_layer():
    """No top-level module or package sits outside the contract (where it could import anything)."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read(ROOT / ".importlinter")
    named = {part.strip() for line in parser["importlinter:contract:layers"]["layers"].split("\n")
             for part in line.replace("|", ":").split(":") if part.strip()}
    covered = {name.split(".")[1] for name in named if name.count(".") >= 1}
    package = ROOT / "focaldet"
    modules = {p.stem for p in package.glob("*.py")} | {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert modules - {"__init__", "__main__"} <= covered, sorted(modules - {"__init__", "__main__"} - covered)
