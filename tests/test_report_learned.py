"""The learned-estimators section end to end on a tiny in-test model (seeded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confroute.estimators import SemanticEntropy, cloze_prompt
from confroute.evaluation.datasets import Example, format_choice_prompt
from confroute.evaluation.report_learned import (
    BEGIN,
    END,
    learned_section_of,
    run_learned_section,
    write_learned_section,
)
from confroute.evaluation.report_learned_data import HiddenStateStore
from confroute.evaluation.report_learned_suite import learned_markdown
from confroute.models import HFLanguageModel
from confroute.types import GenerationConfig
from tests.tiny_models import make_causal_lm

WORDS = ["apple", "river", "stone", "cloud", "paris", "seven", "green", "music", "table",
         "horse", "light", "north", "winter", "bread", "glass", "money"]
ROWS = ("sequence log-prob", "mean token entropy", "HiddenStateProbe (answer mean)",
        "HiddenStateProbe + log-prob (gbm)", "HiddenStateProbe + log-prob (Platt)",
        "PromptProbe (prompt's last token)",
        "HiddenStateProbe + PromptProbe + log-prob + entropy (Platt)", "semantic entropy (N = 4)",
        "SemanticEntropyProbe (no labels)")


class CountingLM(HFLanguageModel):
    """The tiny model, counting its generate calls (to see what the store saves)."""

    n_generate = 0

    def generate(self, prompts, config):  # type: ignore[no-untyped-def]
        CountingLM.n_generate += 1
        return super().generate(prompts, config)


@pytest.fixture(scope="module")
def lm() -> HFLanguageModel:
    model, tok = make_causal_lm("llama", seed=0)
    return CountingLM(model, tok, device="cpu", use_chat_template=False)


def _examples(lm: HFLanguageModel, start: int, n: int) -> list[Example]:
    prompts = [f"tell me {i} about the {WORDS[i % 16]} {WORDS[(i * 7) % 16]}"
               for i in range(start, start + n)]
    answers = [s[0].text for s in lm.generate(prompts, GenerationConfig(max_new_tokens=3))]
    # Half the gold answers are the model's own answer (graded good), half are not.
    return [Example(id=f"q{start + i}", prompt=p, kind="short",
                    gold=(a.strip() or "zz",) if (i * 5) % 3 else ("unmatched gold",))
            for i, (p, a) in enumerate(zip(prompts, answers))]


def _choice(n: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        choices = tuple(rng.choice(WORDS, 4, replace=False).tolist())
        out.append(Example(id=f"c{seed}-{i}", prompt=format_choice_prompt(
            f"which word {i}?", choices), gold=("ABCD"[int(rng.integers(4))],), kind="choice",
            choices=choices, grader="choice"))
    return out


def _run(lm: HFLanguageModel, tmp: Path, train: list[Example], test: list[Example]) -> dict:
    semantic = SemanticEntropy(n_samples=4, max_new_tokens=2, equivalence="exact",
                               variant="weighted", seed=0)
    return run_learned_section(
        train, test, lm, lm, model_id="tiny-llama", store=HiddenStateStore(tmp / "hidden"),
        semantic=semantic, layers=(1, 2), n_se=30, max_new_tokens=3, n_boot=50,
        choice_sets=[("tiny choice A", _choice(30, 0)), ("ARC-like", _choice(30, 1))],
        choice_dev="tiny choice A", curve_sizes=(20, 40), img=tmp / "img" / "curves.png",
        sizes={"n_train": len(train), "n_trivia": 0, "n_test": len(test), "n_nq_train":
               len(train)})


def test_learned_section_end_to_end_writes_every_row(lm: HFLanguageModel, tmp_path: Path
                                                     ) -> None:
    train, test = _examples(lm, 0, 60), _examples(lm, 100, 40)
    summary = _run(lm, tmp_path, train, test)
    assert [r["name"] for r in summary["rows"]] == list(ROWS)
    for r in summary["rows"]:
        assert 0.0 <= r["metrics"]["auroc"]["value"] <= 1.0, r["name"]
        assert r["edge_seconds_per_query"] > 0
    probe = summary["rows"][2]
    assert probe["probes"]["hidden_state_probe"]["layer"] in (1, 2)
    # greedy and prefill timed side by side, kept so a re-run reports the same figures
    g, pre = summary["greedy_seconds_per_query"], summary["prefill_seconds_per_query"]
    assert g > 0 and pre > 0
    timed = HiddenStateStore(tmp_path / "hidden").read_json("timings.json")
    assert [g, pre] in timed.values()
    assert summary["curves"]["sizes"] == [20, 40, 60]
    assert (tmp_path / "img" / "curves.png").stat().st_size > 0
    assert [(r["title"], r["scoring"]) for r in summary["choice"]] == [
        (t, sc) for t in ("tiny choice A", "ARC-like")
        for sc in ("letter", "text (mean)", "text (sum)", "cloze (mean)", "cloze (sum)")]
    chosen = summary["choice_scoring"]
    dev = {r["scoring"]: r["accuracy"]["value"] for r in summary["choice"][:5]}
    assert chosen["set"] == "tiny choice A" and chosen["accuracy"] == dev
    assert dev[chosen["scoring"]] == max(dev.values())
    md = learned_markdown(summary, results=tmp_path / "results.md")
    for name in ROWS:
        assert f"| {name} |" in md
    assert "Smaller than the issue asks" in md and "img/curves.png" in md
    assert "--results docs/results.md --n-train 60 --n-trivia-train 0 --n-test 40`" in md
    assert "| ARC-like | 30 | letter |" in md and "| ARC-like | 30 | text (sum) |" in md.replace(
        "**", "")
    assert f"development half chose the {chosen['scoring']} scoring" in md
    assert f"| ARC-like | 30 | **{chosen['scoring']}** |" in md  # the headline, in bold
    assert f"option entropy AUROC >= 0.65 on ARC-Easy ({chosen['scoring']} scoring" in md

    # A re-run reads every answer from the store: no greedy generation, same results.
    before = CountingLM.n_generate
    again = _run(lm, tmp_path, train, test)
    greedy_calls = CountingLM.n_generate - before
    assert greedy_calls <= 2  # only the semantic-entropy draws of the two subsets
    assert [r["metrics"]["auroc"]["value"] for r in again["rows"]] == pytest.approx(
        [r["metrics"]["auroc"]["value"] for r in summary["rows"]])


def test_section_is_replaced_between_markers(tmp_path: Path) -> None:
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nintro\n")
    write_learned_section(page, "## Learned estimators\n\nfirst\n")
    write_learned_section(page, "## Learned estimators\n\nsecond\n")
    text = page.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "second" in text and "first" not in text and text.startswith("# Results\n\nintro")
    block = learned_section_of(text)
    assert block is not None and block.startswith(BEGIN) and "second" in block


def test_store_treats_a_corrupt_file_as_missing(tmp_path: Path) -> None:
    store = HiddenStateStore(tmp_path / "h")
    store.put("m", "a prompt", "tag", {"x": np.arange(3.0)})
    got = store.get("m", "a prompt", "tag")
    assert got is not None and got["x"].tolist() == [0.0, 1.0, 2.0]
    assert store.get("m", "another prompt", "tag") is None
    (f,) = list((tmp_path / "h").rglob("*.npz"))
    f.write_bytes(b"not a zip file")
    assert store.get("m", "a prompt", "tag") is None and store.n_corrupt == 1


def test_suite_sizes_are_checked_before_any_work(tmp_path: Path) -> None:
    from confroute.errors import InvalidParameterError
    from confroute.evaluation.report_learned_suite import run_learned_suite

    with pytest.raises(InvalidParameterError, match=r"'n_train'.*Got 3"):
        run_learned_suite(tmp_path / "no-data", tmp_path, None, None, n_train=3)
    with pytest.raises(InvalidParameterError, match="'n_se'"):
        run_learned_suite(tmp_path / "no-data", tmp_path, None, None, n_se=-1)


class CountingScores(HFLanguageModel):
    """The tiny model, counting the continuations it scores."""

    n_scored = 0

    def score(self, prompts, continuations):  # type: ignore[no-untyped-def]
        CountingScores.n_scored += len(continuations)
        return super().score(prompts, continuations)


def test_choice_table_scores_letters_and_texts_and_stores_both(tmp_path: Path) -> None:
    from confroute.evaluation.report_learned import choice_table

    model, tok = make_causal_lm("llama", seed=0)
    lm = CountingScores(model, tok, device="cpu", use_chat_template=False)
    exs = _choice(12, 3)
    store = HiddenStateStore(tmp_path / "h")
    rows = choice_table([("set", exs)], lm, "tiny", store, n_boot=20)
    assert [r["scoring"] for r in rows] == ["letter", "text (mean)", "text (sum)",
                                            "cloze (mean)", "cloze (sum)"]
    assert CountingScores.n_scored == 12 * 12  # 4 letters + 4 texts + 4 cloze texts
    # the text rows' argmax is the model's own ranking of the option texts
    for r, norm, cloze in zip(rows[1:], ("mean", "sum") * 2, (False, False, True, True)):
        good = []
        for ex in exs:
            prompt = cloze_prompt(ex.prompt) if cloze else ex.prompt
            got = lm.score([prompt] * 4, [" " + c for c in ex.choices])
            ll = [float(np.sum(g)) / (len(g) if norm == "mean" else 1) for g in got]
            good.append("ABCD"[int(np.argmax(ll))] in ex.gold)
        assert r["accuracy"]["value"] == pytest.approx(np.mean(good))
    # both scorings are stored, under distinct tags; a re-run scores nothing
    assert store.get("tiny", exs[0].prompt, "options:ABCD")["logliks"].shape == (4,)
    text = store.get("tiny", exs[0].prompt, "options-text:ABCD")
    assert text["sums"].shape == (4,) and (text["counts"] >= 1).all()
    assert store.get("tiny", exs[0].prompt, "options-cloze:ABCD")["sums"].shape == (4,)
    before = CountingScores.n_scored
    again = choice_table([("set", exs)], lm, "tiny", store, n_boot=20)
    assert CountingScores.n_scored == before
    assert [r["auroc_entropy"] for r in again] == [r["auroc_entropy"] for r in rows]


def test_scoring_is_chosen_on_the_development_set_only() -> None:
    from confroute.evaluation.report_learned import choose_scoring

    def row(title: str, scoring: str, acc: float, auroc: float = 0.5) -> dict:
        return {"title": title, "scoring": scoring, "accuracy": {"value": acc},
                "auroc_entropy": {"value": auroc}}

    rows = [row("dev", "letter", 0.25, 0.7), row("dev", "text (mean)", 0.31),
            row("dev", "text (sum)", float("nan")), row("test", "letter", 0.9),
            row("test", "text (mean)", 0.4)]
    got = choose_scoring(rows, "dev")
    assert got is not None and got["scoring"] == "text (mean)" and got["set"] == "dev"
    assert got["by"] == "accuracy" and got["auroc_entropy"]["letter"] == 0.7
    # the test set's (higher) letter accuracy plays no part; ties go to the earlier row
    assert choose_scoring([row("dev", "letter", 0.6), row("dev", "text (mean)", 0.6)],
                          "dev")["scoring"] == "letter"
    assert choose_scoring([row("dev", "letter", float("nan"))], "dev") is None


def test_unknown_development_set_is_refused_before_any_work(tmp_path: Path) -> None:
    from confroute.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match=r"'choice_dev' parameter.*Got 'nope'"):
        run_learned_section([], [], None, None, model_id="m", store=None, semantic=None,
                            layers=(1,), n_se=0, choice_sets=[("a", [])], choice_dev="nope")
