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
    """Save a random DeBERTa-v2 (base size) sequence classifier with NLI labels."""
    import torch
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForSequenceClassification

    from confroute.models.embedded import default_embedder_path

    tok = AutoTokenizer.from_pretrained(str(default_embedder_path()), local_files_only=True)
    torch.manual_seed(0)
    cfg = DebertaV2Config(
        vocab_size=len(tok), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512, relative_attention=True,
        position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
        pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_biased_input=False,
        type_vocab_size=0, pad_token_id=tok.pad_token_id, num_labels=3,
        id2label={0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"},
        label2id={"CONTRADICTION": 0, "NEUTRAL": 1, "ENTAILMENT": 2},
    )
    model = DebertaV2ForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


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
           "--max-new-tokens", str(MAX_NEW_TOKENS), "--repeats", str(ctx.repeats),
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
            note="not interleaved: separate process, run right after").check(">=", 5.0),
    ]
