"""Every Python snippet in README.md and docs/ runs as written (issue 11).

The snippets of one page run in order in one namespace, in a fresh working
directory, offline, on the real embedded edge model where they use it. A snippet
that cannot run on this machine (it needs a remote server the page tells the reader
to start) is preceded by ``<!-- snippet: skip REASON -->``; the reason is required.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(?P<marker><!--\s*snippet:\s*skip(?P<reason>[^>]*)-->\s*\n)?"
                   r"```python\n(?P<code>.*?)```", re.S)


def _snippets(page: Path) -> list[tuple[str, str | None]]:
    """(code, skip reason or None) for each python block of a page."""
    out = []
    for m in BLOCK.finditer(page.read_text(encoding="utf-8")):
        reason = m.group("reason").strip() if m.group("marker") else None
        out.append((m.group("code"), reason))
    return out


PAGES_WITH_CODE = [p for p in PAGES if _snippets(p)]
RUNNABLE_PAGES = [p for p in PAGES_WITH_CODE if any(r is None for _, r in _snippets(p))]


def test_pages_are_found() -> None:
    assert ROOT / "README.md" in RUNNABLE_PAGES
    assert ROOT / "docs" / "quickstart.md" in RUNNABLE_PAGES


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_skipped_snippets_say_why(page: Path) -> None:
    for _code, reason in _snippets(page):
        assert reason is None or len(reason) >= 10, f"{page}: skip marker without a reason"


@pytest.mark.integration
@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_snippets_run_as_written(page: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    runnable = [code for code, reason in _snippets(page) if reason is None]
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__snippet__"}
    for i, code in enumerate(runnable):
        try:
            exec(compile(code, f"{page.name}[snippet {i}]", "exec"), namespace)
        except Exception as exc:  # name the snippet that failed
            raise AssertionError(f"{page.relative_to(ROOT)} snippet {i} failed: {exc!r}\n"
                                 f"{code}") from exc
