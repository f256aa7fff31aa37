"""Equivalence backends and greedy clustering."""

from __future__ import annotations

from pathlib import Path

import pytest

from confroute.errors import InvalidParameterError, InvalidTypeError, ModelLoadError
from confroute.estimators.equivalence import (
    EmbeddingEquivalence,
    Equivalence,
    ExactMatchEquivalence,
    NLIEquivalence,
    equivalence_registry,
    resolve_equivalence,
)
from tests.test_estimators_support import TrigramEmbedder
from tests.tiny_models import make_nli_model

# ----------------------------------------------------------------- exact match


@pytest.mark.parametrize(
    ("extractor", "a", "b", "expected"),
    [
        ("number", "#### 12", "so it is 12.0", True),
        ("number", "12", "13", False),
        ("number", "no number", "none either", False),  # None never matches
        ("choice", "(B)", "The answer is b.", True),
        ("choice", "(B)", "(C)", False),
        ("short", "Paris.", "The answer is Paris! It is big.", True),
        ("short", "Paris", "Rome", False),
    ],
)
def test_exact_match_pairs(extractor: str, a: str, b: str, expected: bool) -> None:
    eq = ExactMatchEquivalence(extractor=extractor)
    assert eq.equivalent_pairs("q", [(a, b)]).tolist() == [expected]


def test_identical_normalised_texts_skip_the_backend() -> None:
    eq = ExactMatchEquivalence(extractor="number")
    out = eq.equivalent_pairs("q", [("no number", "No number!"), ("1", "2"), ("x", "y")])
    assert out.tolist() == [True, False, False]
    assert eq.last_n_checks == 2


def test_cluster_exact_ids_in_order_and_check_count() -> None:
    eq = ExactMatchEquivalence(extractor="number")
    texts = ["#### 3", "it is 4", "3.0", "4!", "5", "three 3"]
    assert eq.cluster("q", texts) == [0, 1, 0, 1, 2, 0]
    # each new text is checked against every representative, in one batched call per step
    assert eq.last_n_checks == 1 + 2 + 2 + 2 + 3


def test_cluster_many_matches_cluster() -> None:
    eq = ExactMatchEquivalence(extractor="short")
    groups = [["a cat", "dog", "cat", "bird"], ["x"], [], ["b", "b", "c"]]
    many = eq.cluster_many(["q1", "q2", "q3", "q4"], groups)
    assert many == [eq.cluster(q, g) for q, g in zip(["q1", "q2", "q3", "q4"], groups)]
    assert many == [[0, 1, 0, 2], [0], [], [0, 0, 1]]


def test_cluster_many_length_mismatch() -> None:
    with pytest.raises(InvalidParameterError, match="'questions' has 1, 'texts' has 2"):
        ExactMatchEquivalence().cluster_many(["q"], [["a"], ["b"]])


# ----------------------------------------------------------------- embedding


@pytest.mark.parametrize(
    ("threshold", "expected"), [(0.99, [0, 1, 2]), (0.5, [0, 0, 1]), (-1.0, [0, 0, 0])]
)
def test_embedding_threshold(threshold: float, expected: list[int]) -> None:
    eq = EmbeddingEquivalence(embedder=TrigramEmbedder(), threshold=threshold)
    assert eq.cluster("q", ["big city of Paris", "city of Paris", "zebra"]) == expected


def test_embedding_encodes_once_per_clustering() -> None:
    emb = TrigramEmbedder()
    eq = EmbeddingEquivalence(embedder=emb, threshold=0.99)
    groups = [["alpha", "beta", "gamma"], ["delta", "omega", "kappa"]]
    labels = eq.cluster_many(["q", "q"], groups)
    assert emb.calls == 1  # every text of both prompts in one encode call
    assert labels == [[0, 1, 2], [0, 1, 2]]
    assert eq._memo() is None  # nothing kept after the clustering
    # Pair checks outside a clustering embed what they need.
    assert eq.equivalent_pairs("q", [("alpha", "alpha!"), ("alpha", "zebra")]).tolist() == \
        [True, False]
    assert emb.calls == 2


@pytest.mark.parametrize("threshold", [1.5, -2.0, "high"])
def test_embedding_bad_threshold(threshold: object) -> None:
    eq = EmbeddingEquivalence(embedder=TrigramEmbedder(), threshold=threshold)  # type: ignore[arg-type]
    with pytest.raises((InvalidParameterError, InvalidTypeError), match="'threshold' parameter"):
        eq.equivalent_pairs("q", [("a", "b")])


def test_embedding_bad_embedder() -> None:
    eq = EmbeddingEquivalence(embedder=3)
    with pytest.raises(InvalidTypeError, match="'embedder' parameter of EmbeddingEquivalence"):
        eq.equivalent_pairs("q", [("a", "b")])


# ----------------------------------------------------------------- registry


@pytest.mark.parametrize(
    ("name", "cls"),
    [("exact", ExactMatchEquivalence), ("embedding", EmbeddingEquivalence),
     ("nli", NLIEquivalence)],
)
def test_resolve_by_name(name: str, cls: type[Equivalence]) -> None:
    assert isinstance(resolve_equivalence(name, "equivalence", "X"), cls)
    obj = cls()
    assert resolve_equivalence(obj, "equivalence", "X") is obj


def test_resolve_errors() -> None:
    with pytest.raises(InvalidParameterError, match=r"'equivalence' parameter of X.*'embedding'"):
        resolve_equivalence("entail", "equivalence", "X")
    with pytest.raises(InvalidTypeError, match="'equivalence' parameter of X"):
        resolve_equivalence(3, "equivalence", "X")
    assert set(equivalence_registry.names()) >= {"exact", "embedding", "nli"}


# ----------------------------------------------------------------- NLI


def _nli_with(path: Path, favour: str | None, id2label: dict[int, str] | None = None) -> Path:
    """Save a tiny NLI model that always predicts ``favour`` (by classifier bias)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    make_nli_model(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if id2label is not None:
        model.config.id2label = id2label
        model.config.label2id = {v: k for k, v in id2label.items()}
    if favour is not None:
        labels = {v.lower(): k for k, v in model.config.id2label.items()}
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.zero_()
            model.classifier.bias[labels[favour]] = 10.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def nli_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nli")
    return {
        fav: _nli_with(root / fav, fav) for fav in ("entailment", "neutral", "contradiction")
    }


@pytest.mark.parametrize(
    ("favour", "mode", "expected"),
    [
        ("entailment", "strict", True),
        ("neutral", "strict", False),
        ("contradiction", "strict", False),
        ("entailment", "non_contradiction", True),
        ("neutral", "non_contradiction", True),
        ("contradiction", "non_contradiction", False),
    ],
)
def test_nli_modes(nli_paths: dict[str, Path], favour: str, mode: str, expected: bool) -> None:
    eq = NLIEquivalence(nli_paths[favour], mode=mode, device="cpu")
    out = eq.equivalent_pairs("Capital of France?", [("Paris", "It is Paris"), ("Rome", "Lyon")])
    assert out.tolist() == [expected, expected]
    assert eq.last_n_checks == 2


def test_nli_label_mapping_is_read_from_config(tmp_path: Path) -> None:
    # Reordered, lower-case labels: entailment is id 0 here.
    path = _nli_with(
        tmp_path / "m", "entailment",
        id2label={0: "entailment", 1: "neutral", 2: "contradiction"},
    )
    eq = NLIEquivalence(path, device="cpu")
    assert eq._load()[2:] == (0, 2)
    assert eq.equivalent_pairs("q", [("a", "b")]).tolist() == [True]


def test_nli_missing_labels_lists_them(tmp_path: Path) -> None:
    path = _nli_with(tmp_path / "m", None, id2label={0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    eq = NLIEquivalence(path, device="cpu")
    with pytest.raises(ModelLoadError, match=r"'LABEL_0', 'LABEL_1', 'LABEL_2'"):
        eq.equivalent_pairs("q", [("a", "b")])


def test_nli_missing_or_bad_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError, match="'model_path' parameter of NLIEquivalence"):
        NLIEquivalence().equivalent_pairs("q", [("a", "b")])
    with pytest.raises(ModelLoadError, match="Could not load an NLI model"):
        NLIEquivalence(tmp_path / "nowhere").equivalent_pairs("q", [("a", "b")])


def test_nli_bad_mode(nli_paths: dict[str, Path]) -> None:
    eq = NLIEquivalence(nli_paths["neutral"], mode="loose")
    with pytest.raises(InvalidParameterError, match="'mode' parameter of NLIEquivalence"):
        eq.equivalent_pairs("q", [("a", "b")])


@pytest.mark.parametrize(
    ("favour", "mode", "batch_size", "n_calls"),
    [
        # the forward direction decides alone: 3 rows, the reverse check is skipped
        ("neutral", "strict", 2, 2),
        ("neutral", "strict", 32, 1),
        ("contradiction", "non_contradiction", 2, 2),
        # the forward direction cannot decide: 3 forward rows + 3 reverse rows
        ("entailment", "strict", 2, 4),
        ("entailment", "strict", 32, 2),
        ("neutral", "non_contradiction", 32, 2),
    ],
)
def test_nli_batches_and_skips_needless_reverse_checks(
    nli_paths: dict[str, Path], favour: str, mode: str, batch_size: int, n_calls: int
) -> None:
    eq = NLIEquivalence(nli_paths[favour], mode=mode, batch_size=batch_size, device="cpu")
    model = eq._load()[0]
    calls: list[int] = []
    handle = model.register_forward_hook(lambda m, a, kw, out: calls.append(1), with_kwargs=True)
    try:
        eq.equivalent_pairs("q", [("a", "b"), ("c", "d"), ("e", "f")])
    finally:
        handle.remove()
    assert len(calls) == n_calls


@pytest.mark.parametrize(
    ("favour", "expected", "checks"),
    [("entailment", [0, 0, 0, 0], 2), ("neutral", [0, 1, 2, 1], 1 + 2)],
)
def test_nli_clustering(
    nli_paths: dict[str, Path], favour: str, expected: list[int], checks: int
) -> None:
    eq = NLIEquivalence(nli_paths[favour], device="cpu")
    assert eq.cluster("q", ["Paris", "Rome", "Lyon", "rome!"]) == expected
    assert eq.last_n_checks == checks  # "rome!" joins "Rome" without a check


def test_nli_real_random_model_is_deterministic(tmp_path: Path) -> None:
    path = make_nli_model(tmp_path / "raw", seed=3)
    texts = ["Paris", "It is Paris", "Rome", "Berlin", "a city"]
    a = NLIEquivalence(path, device="cpu", include_question=False).cluster("q", texts)
    b = NLIEquivalence(path, device="cpu", include_question=False).cluster("q", texts)
    assert a == b and a[0] == 0 and len(a) == 5
