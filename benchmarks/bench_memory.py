"""B6: peak resident memory, each measured in a fresh subprocess with the kernel's
high-water mark ``VmHWM`` (``resource.getrusage`` as a fallback; no psutil): the
interpreter with torch and transformers imported (baseline), loading the embedded
edge model, and one semantic-entropy estimate at N = 10 with the embedding backend."""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks._common import MAX_NEW_TOKENS, ROOT, Context, Row

_PRELUDE = """
import json, os, resource, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch, transformers
torch.set_num_threads({threads})
def peak():
    # VmHWM is this process's own high-water mark; ru_maxrss of a fresh child can
    # still carry the parent's peak from before exec.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
"""

_CASES = {
    "baseline": "print(json.dumps({'mb': peak()}))",
    "load": (
        "from confroute.models.embedded import load_default_edge_model\n"
        "m = load_default_edge_model(device='cpu')\n"
        "print(json.dumps({'mb': peak()}))"
    ),
    "se10": (
        "from confroute.models.embedded import load_default_edge_model, load_default_embedder\n"
        "from confroute.estimators import SemanticEntropy, EmbeddingEquivalence\n"
        "m = load_default_edge_model(device='cpu')\n"
        "e = EmbeddingEquivalence(embedder=load_default_embedder(device='cpu'))\n"
        "before = peak()\n"
        "SemanticEntropy(n_samples=10, max_new_tokens={mnt}, equivalence=e, seed=0)"
        ".estimate([{prompt!r}], m)\n"
        "print(json.dumps({{'mb': peak(), 'before': before}}))"
    ),
}


def _measure(case: str, ctx: Context) -> dict[str, float]:
    code = _PRELUDE.format(threads=ctx.threads) + _CASES[case].format(
        mnt=MAX_NEW_TOKENS, prompt=ctx.prompts(1)[0]
    ) if case == "se10" else _PRELUDE.format(threads=ctx.threads) + _CASES[case]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, check=True, timeout=900)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return {k: float(v) for k, v in json.loads(line).items()}


def run(ctx: Context) -> list[Row]:
    base = _measure("baseline", ctx)["mb"]
    load = _measure("load", ctx)["mb"]
    se = _measure("se10", ctx)
    return [
        Row("B6", "peak RSS: python + torch + transformers", [base], "MiB"),
        Row("B6", "peak RSS: load embedded SmolLM2-135M", [load], "MiB",
            note=f"+{load - base:.0f} MiB over baseline"),
        Row("B6", "peak RSS: SE estimate N=10 (+ MiniLM)", [se["mb"]], "MiB",
            note=f"+{se['mb'] - se['before']:.0f} MiB over both models loaded"),
    ]
