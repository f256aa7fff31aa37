"""Shared helpers of the confroute benchmarks: machine description, interleaved timing,
result rows and the lazily loaded real models (embedded SmolLM2-135M, MiniLM).

Timings on a shared machine are noisy, so every comparison is measured side by side
in one process with the compared variants interleaved (A B A B ...), and reported as
min / median / max over the repeats; ratios are taken per repeat (A_i / B_i).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
NQ_DEV = ROOT.parent / "shared" / "data" / "nq_open" / "dev.jsonl"
MAX_NEW_TOKENS = 32


@dataclass
class Row:
    """One measured quantity, with its target when it has one."""

    bench: str
    name: str
    values: list[float]
    unit: str = ""
    target: str = ""
    passed: bool | None = None
    note: str = ""

    @property
    def stats(self) -> tuple[float, float, float]:
        v = [x for x in self.values if x == x]
        if not v:
            return (float("nan"),) * 3  # type: ignore[return-value]
        return min(v), statistics.median(v), max(v)

    def check(self, op: str, bound: float, *, on: str = "median") -> Row:
        """Set ``target``/``passed`` from the median (or max) against ``bound``."""
        lo, med, hi = self.stats
        value = {"median": med, "max": hi, "min": lo}[on]
        self.target = f"{op} {bound:g}"
        self.passed = value <= bound if op == "<=" else value >= bound
        return self


@dataclass
class Context:
    """Models and prompts shared by the benchmarks of one run."""

    threads: int
    repeats: int
    n_prompts: int
    extra: dict[str, Any] = field(default_factory=dict)
    # Where the models run, and from_pretrained arguments of the edge model (e.g.
    # dtype="bfloat16", attn_implementation="sdpa" for the GPU check, `nox -s gpu`).
    device: str = "cpu"
    load_kwargs: dict[str, Any] = field(default_factory=dict)

    def edge(self, **kwargs: Any) -> Any:
        key = "edge:" + json.dumps(kwargs, sort_keys=True)
        if key not in self.extra:
            from confroute.models.embedded import load_default_edge_model

            self.extra[key] = load_default_edge_model(
                device=self.device, **{**self.load_kwargs, **kwargs})
        return self.extra[key]

    def embedder(self) -> Any:
        if "embedder" not in self.extra:
            from confroute.models.embedded import load_default_embedder

            self.extra["embedder"] = load_default_embedder(device=self.device)
        return self.extra["embedder"]

    def prompts(self, n: int | None = None, offset: int = 0) -> list[str]:
        return nq_questions(n or self.n_prompts, offset)


def nq_questions(n: int, offset: int = 0) -> list[str]:
    rows = nq_rows(n, offset)
    return [r["question"] for r in rows]


def nq_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    out = []
    with open(NQ_DEV, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < offset:
                continue
            if len(out) >= n:
                break
            out.append(json.loads(line))
    return out


def free_cores() -> int:
    """Cores of this process's affinity mask not busy with other work (at least 1)."""
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    return max(1, min(cores, round(cores - max(0.0, load - 1.0))))


def set_threads(threads: int | None) -> int:
    import torch

    n = threads if threads else free_cores()
    torch.set_num_threads(n)
    return int(torch.get_num_threads())


def machine() -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores_available": len(os.sched_getaffinity(0)),
        "memory_gb": round(mem_gb, 1),
        "torch_threads": torch.get_num_threads(),
        "load_avg": tuple(round(x, 2) for x in os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleave(
    variants: dict[str, Callable[[], Any]], repeats: int, *, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds of each variant per repeat, run in turn (A B A B ...).

    CPU time is far less sensitive than wall time to other processes sharing the
    cores, so both are kept; targets are checked on wall time.
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            c0 = time.process_time()
            wall[k].append(timed(fn)[0])
            cpu[k].append(time.process_time() - c0)
    return wall, cpu


def ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-repeat ratios a_i / b_i of interleaved timings."""
    return [x / y for x, y in zip(a, b)]


def fmt(x: float) -> str:
    if x != x:
        return "nan"
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 1e5 or ax < 1e-3:
        return f"{x:.3g}"
    if ax >= 100:
        return f"{x:.0f}"
    return f"{x:.4g}"
