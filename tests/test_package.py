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
        "import sys, confroute\n"
        "from confroute.cli import build_parser\n"
        "build_parser()\n"
        "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'uvicorn', 'sklearn',"
        " 'matplotlib', 'httpx') if m in sys.modules]\n"
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
