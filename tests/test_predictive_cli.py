"""The predictive-routing commands of the ``confroute`` CLI, on tiny in-process models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from confroute.cli import main
from confroute.predictive import QueryRouter, read_labels_jsonl
from confroute.router import Router
from tests.tiny_models import make_nli_model, save_causal_lm

QUESTIONS = [
    ("q0", "The capital of France is", ["Paris"]),
    ("q1", "Two plus two is", ["four", "4"]),
    ("q2", "Who wrote Hamlet?", ["William Shakespeare"]),
    ("q3", "The capital of Italy is", ["Rome"]),
    ("q4", "What is the answer?", ["42"]),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    weak = save_causal_lm(root / "weak", seed=0)
    strong = save_causal_lm(root / "strong", arch="gpt2", seed=1)
    encoder = make_nli_model(root / "encoder", seed=0)
    return {"weak": str(weak), "strong": str(strong), "encoder": str(encoder)}


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"id": i, "question": q, "answers": a}) + "\n"
                            for i, q, a in QUESTIONS))
    return path


def _labels_file(path, n=40, seed=0):
    """Synthetic label rows: prompts about proofs are strong wins, greetings weak wins."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        hard = i % 2 == 0
        text = (f"prove the theorem number {i} about {rng.integers(1000)}" if hard
                else f"hello there friend {i}")
        win = "strong" if hard else "weak"
        rows.append({"id": f"r{i}", "prompt": text, "model_a": "S", "model_b": "W",
                     "winner_model_a": int(win == "strong"), "winner_model_b": int(win == "weak"),
                     "winner_tie": 0, "se_a": None, "se_b": None})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_label_se_resumable_and_cached(models, data, tmp_path, capsys):
    out = tmp_path / "labels.jsonl"
    cache = tmp_path / "gen.sqlite"
    args = ["label", "--weak", models["weak"], "--strong", models["strong"], "--data", str(data),
            "--out", str(out), "--n-samples", "2", "--equivalence", "exact",
            "--max-new-tokens", "4", "--batch-size", "2", "--cache", str(cache)]
    assert main([*args, "--limit", "3"]) == 0
    rows = read_labels_jsonl(out)
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"]
    assert all(r["model_a"] == models["strong"] and r["model_b"] == models["weak"] for r in rows)
    assert all(r["se_a"] is not None and r["se_b"] is not None for r in rows)
    assert rows[0]["prompt"] == "The capital of France is"
    assert "3 rows" in capsys.readouterr().out
    first = out.read_text()
    # resume: the first three rows are kept as they are, only the rest is labelled
    assert main(args) == 0
    rows = read_labels_jsonl(out)
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3", "q4"]
    assert out.read_text().startswith(first)
    # from scratch with the cache: identical labels without new generations
    out2 = tmp_path / "again.jsonl"
    assert main([*args[:8], str(out2), *args[9:]]) == 0
    assert out2.read_text() == out.read_text()


def test_label_accuracy_mode(models, data, tmp_path, capsys):
    out = tmp_path / "acc.jsonl"
    assert main(["label", "--labels", "accuracy", "--weak", models["weak"], "--strong",
                 models["strong"], "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "3"]) == 0
    rows = read_labels_jsonl(out)
    assert len(rows) == 5 and all(r["se_a"] is None for r in rows)
    # random tiny models answer nothing right: every prompt is a tie
    assert all(r["winner_tie"] == 1 for r in rows)
    assert "5 ties" in capsys.readouterr().out


def test_label_errors(models, tmp_path, capsys):
    bad = tmp_path / "noanswers.jsonl"
    bad.write_text(json.dumps({"prompt": "hi"}) + "\n")
    rc = main(["label", "--labels", "accuracy", "--weak", models["weak"], "--strong",
               models["strong"], "--data", str(bad), "--out", str(tmp_path / "o.jsonl")])
    assert rc == 2 and "no 'answers'" in capsys.readouterr().err
    rc = main(["label", "--weak", str(tmp_path / "missing"), "--strong", models["strong"],
               "--data", str(bad), "--out", str(tmp_path / "o.jsonl")])
    assert rc == 2 and "'--weak' option" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["sw", "knn", "mf", "mlp"])
def test_train_router(models, tmp_path, capsys, kind):
    labels = _labels_file(tmp_path / "labels.jsonl")
    out = tmp_path / "router.json"
    cache = tmp_path / "emb.sqlite"
    params = {"knn": ["--param", "k=3"], "mf": ["--param", "epochs=30"],
              "mlp": ["--param", "epochs=30", "--param", "hidden=8"]}.get(kind, [])
    assert main(["train-router", "--kind", kind, "--labels", str(labels), "--out", str(out),
                 "--embedder", models["encoder"], "--cache", str(cache), *params]) == 0
    text = capsys.readouterr().out
    assert "held-out AUROC" in text and "refitted on all 40 rows" in text
    router = QueryRouter.load(out)
    assert router.n_features_in_ == 32
    assert cache.exists()


def test_train_router_errors(models, tmp_path, capsys):
    labels = _labels_file(tmp_path / "labels.jsonl")
    rc = main(["train-router", "--kind", "knn", "--labels", str(labels), "--out",
               str(tmp_path / "r.json"), "--embedder", models["encoder"], "--param", "kk=3"])
    assert rc == 2 and "'--param' options" in capsys.readouterr().err
    rc = main(["train-router", "--kind", "knn", "--labels", str(labels), "--out",
               str(tmp_path / "r.json"), "--embedder", models["encoder"], "--param", "k"])
    assert rc == 2 and "NAME=VALUE" in capsys.readouterr().err
    rc = main(["train-router", "--kind", "knn", "--labels", str(labels), "--out",
               str(tmp_path / "r.json"), "--embedder", models["encoder"],
               "--test-fraction", "0"])
    assert rc == 2 and "both must be non-empty" in capsys.readouterr().err


def test_two_stage_commands(models, tmp_path, capsys):
    labels = _labels_file(tmp_path / "labels.jsonl")
    gate = tmp_path / "gate.json"
    assert main(["train-router", "--kind", "knn", "--labels", str(labels), "--out", str(gate),
                 "--embedder", models["encoder"]]) == 0
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(
        json.dumps({"prompt": f"hello there friend {i}", "label": i % 2}) + "\n"
        for i in range(8)))
    post = tmp_path / "post.json"
    assert main(["calibrate", "--data", str(calib), "--out", str(post), "--edge",
                 models["weak"]]) == 0
    ts_path = tmp_path / "ts.json"
    assert main(["two-stage", "--gate", str(gate), "--router", str(post), "--gate-share", "0.5",
                 "--data", str(labels), "--embedder", models["encoder"], "--out",
                 str(ts_path)]) == 0
    assert "gate threshold" in capsys.readouterr().out
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": k, "prompt": p}) + "\n" for k, p in [
        ("a", "prove the theorem number 4 about 17"), ("b", "hello there friend 3")]))
    out = tmp_path / "decisions.jsonl"
    assert main(["route-two-stage", "--router", str(ts_path), "--input", str(prompts),
                 "--output", str(out), "--edge", models["weak"], "--embedder",
                 models["encoder"]]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert all(r["reason"].startswith(("stage 1", "stage 2")) for r in rows)
    stats = json.loads(capsys.readouterr().err.strip().splitlines()[-1])["stats"]
    assert stats["n_prompts"] == 2
    assert stats["edge_generations_avoided"] == sum(r["reason"].startswith("stage 1")
                                                    for r in rows)
    # without the gate's embedder the load is refused with a clear message
    rc = main(["route-two-stage", "--router", str(ts_path), "--edge", models["weak"], "x"])
    assert rc == 2 and "'embedder' parameter" in capsys.readouterr().err


def test_calibrate_predictive_with_default_embedder(models, tmp_path, capsys):
    """A query router as a pre-generation Router, saved and used by 'confroute route'."""
    labels = _labels_file(tmp_path / "labels.jsonl")
    qr = tmp_path / "qr.json"
    assert main(["train-router", "--kind", "sw", "--labels", str(labels), "--out", str(qr)]) == 0
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(
        json.dumps({"prompt": t, "label": lab}) + "\n" for t, lab in
        [("prove the theorem number 1 about 2", 0), ("hello there friend 9", 1),
         ("prove the theorem number 5 about 8", 0), ("hello there friend 11", 1),
         ("prove the theorem number 7 about 3", 1), ("hello there friend 12", 0)]))
    out = tmp_path / "router.json"
    assert main(["calibrate-predictive", "--query-router", str(qr), "--data", str(calib),
                 "--out", str(out), "--edge", models["weak"], "--max-cloud-fraction",
                 "0.5"]) == 0
    assert "pre-generation router" in capsys.readouterr().out
    router = Router.load(out)
    assert router.estimators[0].name == "query_router"
    assert main(["route", "--router", str(out), "--edge", models["weak"], "--json",
                 "prove the theorem number 2 about 9", "hello there friend 4"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and all("query_router" in r["scores"] for r in rows)
    # escalated prompts got no edge answer: the edge model was not run for them
    assert all(r["edge_answer"] is None for r in rows if r["source"] == "cloud")


class _CountingModel:
    """A real tiny model that counts generate calls (to prove validation comes first)."""

    def __init__(self, model):
        self.model, self.name, self.calls = model, model.name, 0

    def generate(self, prompts, config):
        self.calls += 1
        return self.model.generate(prompts, config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "'batch_size' parameter of accuracy_label_file"),
        ({"grader": "no_such_grader"}, "no_such_grader"),
        ({"ids": [0, 1]}, "ids"),
        ({"max_new_tokens": 0}, "'max_new_tokens' parameter of GenerationConfig"),
    ],
)
def test_accuracy_label_file_checks_its_input_before_generating(models, tmp_path, kwargs,
                                                                 message):
    from confroute import ConfrouteError
    from confroute.models.hf import HFLanguageModel
    from confroute.predictive.labels import accuracy_label_file

    weak = _CountingModel(HFLanguageModel(models["weak"]))
    strong = _CountingModel(HFLanguageModel(models["strong"]))
    args = {"prompts": [q for _, q, _ in QUESTIONS], "ids": [i for i, _, _ in QUESTIONS],
            "references": [a for *_, a in QUESTIONS], "weak": weak, "strong": strong,
            "out_path": tmp_path / "labels.jsonl", **kwargs}
    with pytest.raises(ConfrouteError, match=message):
        accuracy_label_file(**args)
    assert (weak.calls, strong.calls) == (0, 0)
    assert not (tmp_path / "labels.jsonl").exists()


def test_accuracy_label_file_resumes_and_refuses_other_models(models, tmp_path):
    from confroute import InvalidParameterError
    from confroute.models.hf import HFLanguageModel
    from confroute.predictive.labels import accuracy_label_file

    weak = _CountingModel(HFLanguageModel(models["weak"]))
    strong = _CountingModel(HFLanguageModel(models["strong"]))
    prompts, ids = [q for _, q, _ in QUESTIONS], [i for i, _, _ in QUESTIONS]
    refs = [a for *_, a in QUESTIONS]
    out = tmp_path / "labels.jsonl"
    first = accuracy_label_file(prompts[:3], ids[:3], refs[:3], weak, strong, out,
                                batch_size=2, progress=False)
    assert [r["id"] for r in first] == ids[:3] and weak.calls == 2
    rows = accuracy_label_file(prompts, ids, refs, weak, strong, out, batch_size=8,
                               progress=False)
    assert [r["id"] for r in rows] == ids and weak.calls == 3  # only the 2 new ids
    for r in rows:
        assert r["winner_model_a"] + r["winner_model_b"] + r["winner_tie"] == 1
    with pytest.raises(InvalidParameterError, match="points to labels made with"):
        accuracy_label_file(prompts, ids, refs, strong, weak, out, progress=False)
