"""Package-level contracts: light import, public names, no hidden heavy imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

import confroute


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)


def test_import_does_not_load_torch_transformers_or_servers():
    res = _run(
        "import sys, confroute, confroute.integrations\n"
        "from confroute.cli import build_parser\n"
        "build_parser()\n"
        "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'uvicorn', 'sklearn',"
        " 'matplotlib', 'httpx', 'langchain_core', 'litellm', 'openai') if m in sys.modules]\n"
        "print(heavy)\n"
        "assert heavy == [], heavy\n"
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", sorted(confroute.__all__))
def test_every_public_name_resolves(name):
    assert getattr(confroute, name) is not None


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        confroute.Nope  # noqa: B018


def test_python_dash_m_runs_the_cli():
    res = subprocess.run([sys.executable, "-m", "confroute", "--version"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0
    assert confroute.__version__ in res.stdout


COMMANDS = ("route", "calibrate", "evaluate", "evaluate-report", "label", "train-router",
            "calibrate-predictive", "two-stage", "route-two-stage", "serve")


def test_every_command_help_imports_nothing_heavy():
    res = _run(
        "import contextlib, io, sys\n"
        "from confroute.cli import build_parser\n"
        f"for cmd in {COMMANDS!r}:\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        build_parser().parse_args([cmd, '--help'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'uvicorn', 'sklearn',"
        " 'matplotlib', 'httpx') if m in sys.modules]\n"
        "assert heavy == [], heavy\n"
    )
    assert res.returncode == 0, res.stderr


def test_python_dash_m_help_lists_every_command():
    res = subprocess.run([sys.executable, "-m", "confroute", "--help"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    listed = {line.split()[0] for line in res.stdout.splitlines() if line.startswith("    ")}
    assert set(COMMANDS) <= listed, listed


def test_the_console_script_is_the_cli_main():
    import importlib
    import re
    from pathlib import Path

    from confroute.cli import main

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    scripts = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]  # tomllib is 3.11+
    module, attr = re.search(r'^confroute = "([\w.]+):(\w+)"$', scripts, re.M).groups()
    assert getattr(importlib.import_module(module), attr) is main
