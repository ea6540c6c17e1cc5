"""The CLI shell: discovery of sub-commands and error handling."""

from __future__ import annotations

import subprocess
import sys

import pytest

from explora_geo.cli import build_parser


def test_version_and_help_list_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--version"])
    assert info.value.code == 0
    assert "explora-geo 0.1.0" in capsys.readouterr().out


def test_console_script_runs_as_module() -> None:
    proc = subprocess.run([sys.executable, "-m", "explora_geo", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: explora-geo" in proc.stdout
