"""Tests for tinyclip/cli.py and ``python -m tinyclip``."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinyclip
from tinyclip import backend
from tinyclip.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"tinyclip {tinyclip.__version__}\n"


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tinyclip") and "info" in out and "--version" in out


def test_no_command_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "usage: tinyclip" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["fly"]) == 2
    assert "invalid choice: 'fly'" in capsys.readouterr().err


def test_info(capsys, monkeypatch):
    monkeypatch.delenv("TINYCLIP_BACKEND", raising=False)
    assert main(["info"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["tinyclip"] == tinyclip.__version__
    assert lines["python"].startswith(platform.python_version())
    assert lines["numpy"] == np.__version__
    assert lines["backend"] == "numpy (from built-in default)"
    assert lines["gpu"].startswith("yes" if backend.gpu_available() else "no")
    assert lines["cpus"].endswith(f"of {os.cpu_count()}")


def test_info_reports_the_backend_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("TINYCLIP_BACKEND", "cupy")
    assert main(["info"]) == 0
    assert "backend   cupy (from TINYCLIP_BACKEND)" in capsys.readouterr().out


def test_info_with_an_invalid_backend_says_so_and_fails(capsys, monkeypatch):
    monkeypatch.setenv("TINYCLIP_BACKEND", "jax")
    assert main(["info"]) == 1
    out = capsys.readouterr().out
    assert "backend   invalid: TINYCLIP_BACKEND must be one of" in out and "cpus" in out


def test_python_dash_m_tinyclip():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "tinyclip", "--version"], capture_output=True, text=True,
                            cwd=REPO_ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tinyclip {tinyclip.__version__}\n"


def test_console_script():
    script = Path(sys.executable).parent / "tinyclip"
    if not script.exists():
        pytest.skip("the tinyclip console script is not installed next to this Python (pip install -e .)")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tinyclip {tinyclip.__version__}\n"
