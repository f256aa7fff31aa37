"""B3 (NLI part): a semantic-entropy estimate at N = 10 with an NLI model of
DeBERTa-base size (12 layers, hidden 768, relative attention; random weights built
here, with the MiniLM WordPiece tokenizer), loaded through ``NLIEquivalence(path)``.

Optionally, the same estimate with lm-polygraph 0.7.0 from a separate venv (see
``lmpg_se.py``); it is never imported by confroute.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._common import MAX_NEW_TOKENS, Context, Row, interleave, timed

LMPG_PYTHON = os.environ.get("CONFROUTE_LMPG_PYTHON", "/tmp/lmpg/bin/python")


def build_nli(path: Path) -> Path:
    """Save a random DeBERTa (base size: 12 layers, hidden 768, relative attention)
    sequence classifier with NLI labels, and a DeBERTa (byte-level BPE) tokenizer made
    from the SmolLM2 vocabulary. DeBERTa v1 classes, because lm-polygraph 0.7.0 loads
    its NLI model with ``DebertaForSequenceClassification`` / ``DebertaTokenizer``."""
    import torch
    from transformers import (
        AutoTokenizer,
        DebertaConfig,
        DebertaForSequenceClassification,
        DebertaTokenizer,
    )

    src = AutoTokenizer.from_pretrained(_edge_dir(), local_files_only=True)
    spec = json.loads(src.backend_tokenizer.to_str())["model"]
    vocab = dict(spec["vocab"])
    for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = DebertaTokenizer(vocab=vocab, merges=merges)
    torch.manual_seed(0)
    cfg = DebertaConfig(
        vocab_size=len(vocab), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512, relative_attention=True,
        max_relative_positions=-1, pos_att_type=["c2p", "p2c"], position_biased_input=False,
        type_vocab_size=0, pad_token_id=vocab["[PAD]"], num_labels=3,
        id2label={0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"},
        label2id={"CONTRADICTION": 0, "NEUTRAL": 1, "ENTAILMENT": 2},
    )
    model = DebertaForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _edge_dir() -> str:
    from confroute._cache_dir import cache_dir
    from confroute.models.embedded import _converted_dir, default_edge_model_path

    return str(_converted_dir(default_edge_model_path(), cache_dir("models")))


def run(ctx: Context) -> list[Row]:
    from confroute.estimators import NLIEquivalence, SemanticEntropy

    edge = ctx.edge()
    prompt = ctx.prompts(1)
    tmp = Path(tempfile.mkdtemp(prefix="confroute-nli-"))
    nli_path = build_nli(tmp / "nli")
    n_params = _n_params(nli_path)
    equiv = NLIEquivalence(nli_path, device="cpu")
    se = SemanticEntropy(n_samples=10, max_new_tokens=MAX_NEW_TOKENS, equivalence=equiv, seed=0)
    holder: dict[str, Any] = {}

    def estimate() -> None:
        holder["est"] = se.estimate(prompt, edge)

    wall, _ = interleave({"se": estimate}, ctx.repeats)
    est = holder["est"]
    cluster = [timed(lambda: se.score_samples(est.samples))[0] for _ in range(ctx.repeats)]
    n_checks = float(est.details["n_checks"][0])
    rows = [
        Row("B3", "SE N=10 estimate, NLI (DeBERTa-base size)", wall["se"], "s",
            note=f"{n_params / 1e6:.0f}M-parameter NLI model"),
        Row("B3", "NLI clustering share of SE estimate",
            [100 * c / w for c, w in zip(cluster, wall["se"])], "%"),
        Row("B3", "NLI checks made / N(N-1)/2", [n_checks / 45.0], "",
            note=f"{n_checks:.0f} of 45 pairs; {int(est.details['n_clusters'][0])} clusters"),
    ]
    rows += _lm_polygraph(ctx, edge, prompt[0], nli_path, wall["se"])
    return rows


def _n_params(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path / "model.safetensors"), framework="np") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open is not iterable
            total += _prod(f.get_slice(k).get_shape())
    return total


def _prod(shape: Any) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _lm_polygraph(
    ctx: Context, edge: Any, prompt: str, nli_path: Path, ours: list[float]
) -> list[Row]:
    script = Path(__file__).with_name("lmpg_se.py")
    if not Path(LMPG_PYTHON).exists():
        return [Row("B3", "lm-polygraph SE / confroute SE", [], "x",
                    note=f"skipped: no lm-polygraph venv at {LMPG_PYTHON}")]
    model_dir = str(edge.model.name_or_path)
    cmd = [LMPG_PYTHON, str(script), "--model", model_dir, "--nli", str(nli_path),
           "--prompt", edge.render_prompt(prompt), "--n", "10",
           "--max-new-tokens", str(MAX_NEW_TOKENS), "--repeats", "1",
           "--threads", str(ctx.threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired:
        return [Row("B3", "lm-polygraph SE / confroute SE", [], "x", note="skipped: timeout")]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return [Row("B3", "lm-polygraph SE / confroute SE", [], "x",
                    note=f"skipped: lm-polygraph run failed ({err})")]
    res = json.loads(lines[-1])
    theirs = list(res["seconds"])
    import statistics

    ours_med = statistics.median(ours)
    return [
        Row("B3", "lm-polygraph 0.7.0 SE N=10 (same LM, NLI, prompt)", theirs, "s",
            note=res.get("note", "")),
        Row("B3", "lm-polygraph SE / confroute SE", [t / ours_med for t in theirs], "x",
            note="separate process, 1 run after a warm-up, not interleaved").check(">=", 5.0),
    ]
