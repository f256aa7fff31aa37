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
    # Our default NLI input is question + answer (Kuhn et al.); lm-polygraph feeds
    # the two sample texts alone. Both are measured; the side-by-side comparison
    # uses the same inputs as lm-polygraph.
    equivs = {
        "default": NLIEquivalence(nli_path, device="cpu"),
        "answers": NLIEquivalence(nli_path, device="cpu", include_question=False),
    }
    ses = {k: SemanticEntropy(n_samples=10, max_new_tokens=MAX_NEW_TOKENS, equivalence=e,
                              seed=0) for k, e in equivs.items()}
    rows_sent = {k: _count_nli_rows(e) for k, e in equivs.items()}
    holder: dict[str, Any] = {}

    def estimate(k: str) -> None:
        rows_sent[k].clear()
        holder[k] = ses[k].estimate(prompt, edge)

    wall, _ = interleave({k: (lambda k=k: estimate(k)) for k in ses}, ctx.repeats)
    n_rows = {k: sum(v) for k, v in rows_sent.items()}  # of the last estimate
    clustering: dict[str, list[float]] = {}
    rows: list[Row] = []
    labels = {"default": "question + answer (default)", "answers": "answers only"}
    for k, se in ses.items():
        est = holder[k]
        cluster = [timed(lambda se=se, est=est: se.score_samples(est.samples))[0]
                   for _ in range(ctx.repeats)]
        clustering[k] = cluster
        n_checks = float(est.details["n_checks"][0])
        rows += [
            Row("B3", f"SE N=10 estimate, NLI (DeBERTa-base size), {labels[k]}", wall[k], "s",
                note=f"{n_params / 1e6:.0f}M-parameter NLI model"),
            Row("B3", f"NLI clustering share of SE estimate, {labels[k]}",
                [100 * c / w for c, w in zip(cluster, wall[k])], "%"),
            Row("B3", f"NLI checks made / N(N-1)/2, {labels[k]}", [n_checks / 45.0], "",
                note=f"{n_checks:.0f} of 45 pairs, {n_rows[k]} NLI forward rows; "
                     f"{int(est.details['n_clusters'][0])} clusters"),
        ]
    rows += _lm_polygraph(ctx, edge, prompt[0], nli_path, wall["answers"],
                          clustering["answers"], n_rows["answers"])
    return rows


def _count_nli_rows(equiv: Any) -> list[int]:
    """Premise/hypothesis pairs sent to the NLI model by ``equiv`` (both directions)."""
    sent: list[int] = []
    real = equiv._predict

    def counting(premises: list[str], hypotheses: list[str]) -> Any:
        sent.append(len(premises))
        return real(premises, hypotheses)

    equiv._predict = counting
    return sent


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
    ctx: Context, edge: Any, prompt: str, nli_path: Path, ours: list[float],
    cluster: list[float], nli_rows: int,
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
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in res.get("parts", {}).items())
    return [
        Row("B3", "lm-polygraph 0.7.0 SE N=10 (same LM, NLI, prompt)", theirs, "s",
            note=f"{res.get('note', '')}; {parts}"),
        Row("B3", "lm-polygraph SE / confroute SE (answers only, as lm-polygraph)",
            [t / ours_med for t in theirs], "x",
            note="separate process, 1 run after a warm-up, not interleaved").check(">=", 5.0),
        *_budget_rows(statistics.median(theirs), ours, cluster, nli_rows),
    ]


def _budget_rows(theirs: float, ours: list[float], cluster: list[float],
                 nli_rows: int) -> list[Row]:
    """What a 5x margin over lm-polygraph leaves for the NLI model."""
    import statistics

    generation = [w - c for w, c in zip(ours, cluster)]
    per_row = statistics.median(cluster) / max(nli_rows, 1)
    affordable = (theirs / 5.0 - statistics.median(generation)) / per_row
    return [
        Row("B3", "generation part of our SE estimate (answers only)", generation, "s",
            note="estimate minus clustering: greedy + 10 samples in one pass"),
        Row("B3", "NLI time per forward row", [1000 * c / max(nli_rows, 1) for c in cluster],
            "ms"),
        Row("B3", "NLI rows that fit a 5x margin", [affordable], "",
            note=f"an exact clustering of these samples needs {nli_rows} (no pair of "
                 "distinct answers merges under random NLI weights)"),
    ]
