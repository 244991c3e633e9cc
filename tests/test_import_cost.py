"""What a command imports: the dataset tools and ``focaldet --help`` never pay for Lightning."""

import subprocess
import sys

import pytest

from helpers import REPO


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("code", [
    "import focaldet.data.cli",
    "import focaldet.cli",
    "import focaldet.data",
    "from focaldet.data import read_image",
])
def test_no_lightning_for_the_data_tools_and_the_command_table(code):
    loaded = _modules_after(code)
    assert not {m for m in loaded if m == "lightning" or m.startswith("lightning.")}, code


def test_the_data_package_imports_nothing_before_use():
    loaded = _modules_after("import focaldet.data")
    assert "focaldet.data.doctor" not in loaded and "torchvision" not in loaded


def test_the_lightning_names_still_answer_from_focaldet_cli():
    from focaldet import cli
    from focaldet.engine.lightning_cli import FocaldetCLI, trainer_defaults

    assert cli.FocaldetCLI is FocaldetCLI and cli.trainer_defaults is trainer_defaults
    with pytest.raises(AttributeError):
        cli.no_such_name
