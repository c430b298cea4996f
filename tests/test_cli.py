import subprocess
import sys
from pathlib import Path

import pytest

from quicknat import __version__
from quicknat.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "quicknat.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "quicknat" in out.stdout


def test_unknown_command_is_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("quicknat: error:")


def test_readme_and_ci_agree():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_line = [ln for ln in ci.splitlines() if ln.startswith("python3 -m venv")][0]
    assert test_line in readme
    blocks = [ln for ln in readme.splitlines() if ln.startswith("python3 -m venv .venv")]
    assert len(blocks) == 2, "README has exactly two set-up commands"
    assert any(b.endswith("quicknat segment") for b in blocks)
