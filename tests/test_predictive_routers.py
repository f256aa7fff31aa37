"""Tests of the query-only routers, the query embedder cache, the estimator adapter
and the cloud-share threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.optimize import minimize_scalar
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from confroute.errors import (
    EstimationError,
    InvalidParameterError,
    InvalidTypeError,
    NotFittedError,
    SerializationError,
)
from confroute.estimators.base import estimate_many, estimator_registry
from confroute.predictive import (
    KNNRouter,
    MatrixFactorizationRouter,
    MLPRouter,
    QueryEmbedder,
    QueryRouter,
    QueryRouterEstimator,
    SWRankingRouter,
    router_registry,
    threshold_for_cloud_share,
)

torch.set_num_threads(1)

DIM = 32

FACTORIES = {
    "sw": lambda: SWRankingRouter(),
    "knn1": lambda: KNNRouter(),
    "knn5": lambda: KNNRouter(k=5),
    "mf": lambda: MatrixFactorizationRouter(dim=16, epochs=100),
    "mf_nobias_minibatch": lambda: MatrixFactorizationRouter(
        dim=8, epochs=30, batch_size=64, model_bias=False
    ),
    "mlp": lambda: MLPRouter(hidden=32, epochs=200, lr=1e-2),
}


def _clusters(rng: np.random.Generator, centers: np.ndarray, n: int, noise: float = 0.25):
    """Points around two centres on the unit sphere; cluster 0 is won by the strong model."""
    c = rng.integers(0, 2, n)
    X = centers[c] + noise * rng.standard_normal((n, centers.shape[1]))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), c


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((2, DIM))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    X_tr, c_tr = _clusters(rng, centers, 300)
    X_te, c_te = _clusters(rng, centers, 200)
    labels = np.where(c_tr == 0, "strong", "weak").astype(object)
    labels[rng.random(300) < 0.1] = "tie"  # ties sprinkled over both clusters
    return X_tr, labels, X_te, c_te


@pytest.fixture(scope="module")
def fitted(planted):
    X_tr, labels, _, _ = planted
    return {name: make().fit(X_tr, labels) for name, make in FACTORIES.items()}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_router_recovers_planted_rule(fitted, planted, name):
    _, _, X_te, c_te = planted
    p = fitted[name].p_strong(X_te)
    assert p.shape == (len(X_te),) and p.dtype == np.float64
    assert np.all((p >= 0) & (p <= 1))
    assert roc_auc_score(c_te == 0, p) > 0.95


@pytest.mark.parametrize("name", list(FACTORIES))
def test_numeric_labels_equal_string_labels(planted, name):
    X_tr, labels, X_te, _ = planted
    credits = np.array([{"strong": 1.0, "weak": 0.0, "tie": 0.5}[s] for s in labels])
    a = FACTORIES[name]().fit(X_tr[:120], labels[:120]).p_strong(X_te[:20])
    b = FACTORIES[name]().fit(X_tr[:120], credits[:120]).p_strong(X_te[:20])
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_save_load_identical_predictions(fitted, planted, tmp_path, name):
    router = fitted[name]
    X_te = planted[2]
    path = tmp_path / f"{name}.json"
    router.save(path)
    loaded = QueryRouter.load(path)
    assert type(loaded) is type(router)
    assert loaded.get_params() == router.get_params()
    np.testing.assert_array_equal(loaded.p_strong(X_te), router.p_strong(X_te))
    # loading through the concrete class works too, through another class does not
    np.testing.assert_array_equal(type(router).load(path).p_strong(X_te[:5]),
                                  router.p_strong(X_te[:5]))
    other = MLPRouter if not isinstance(router, MLPRouter) else KNNRouter
    with pytest.raises(SerializationError, match=f"not a {other.__name__}"):
        other.load(path)


def test_saved_file_is_json_and_tamper_evident(fitted, tmp_path):
    path = tmp_path / "mlp.json"
    fitted["mlp"].save(path)
    doc = json.loads(path.read_text())
    assert doc["kind"] == "query_router" and doc["payload"]["name"] == "mlp"
    doc["payload"]["params"]["hidden"] = 31
    path.write_text(json.dumps(doc))
    with pytest.raises(SerializationError, match="checksum"):
        QueryRouter.load(path)


def test_set_state_rejects_bad_shapes(fitted):
    state = fitted["mf"].get_state()
    state["projection"] = state["projection"][:, :5]
    with pytest.raises(SerializationError, match="'projection' has shape"):
        MatrixFactorizationRouter(dim=16).set_state(state)
    with pytest.raises(SerializationError, match="'embeddings'"):
        SWRankingRouter().set_state({"n_features_in": 3, "credits": np.zeros(2)})


@pytest.mark.parametrize("cls", [MatrixFactorizationRouter, MLPRouter])
def test_torch_routers_are_deterministic_with_seed(planted, cls):
    X_tr, labels, X_te, _ = planted
    a = cls(epochs=5, seed=3).fit(X_tr, labels).p_strong(X_te)
    b = cls(epochs=5, seed=3).fit(X_tr, labels).p_strong(X_te)
    c = cls(epochs=5, seed=4).fit(X_tr, labels).p_strong(X_te)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_registry_and_clone():
    assert router_registry.names() == ["knn", "mf", "mlp", "sw"]
    r = clone(MatrixFactorizationRouter(dim=8, seed=2))
    assert r.get_params()["dim"] == 8 and not hasattr(r, "n_features_in_")


# ----------------------------------------------------------------------------- SW details


def test_sw_matches_weighted_bradley_terry_mle():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((40, 6))
    credits = rng.choice([0.0, 0.5, 1.0], size=40)
    q = rng.standard_normal((1, 6))
    gamma, alpha = 7.0, 0.3
    router = SWRankingRouter(gamma=gamma, pseudo_count=alpha).fit(X, credits)
    # independent computation: weights as defined, then maximise the BT likelihood numerically
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    qn = q[0] / np.linalg.norm(q[0])
    S = Xn @ qn
    w = gamma ** (1 + S / S.max())
    w_all = np.append(w, 2 * alpha)  # pseudo-count = one virtual tie of weight 2 alpha
    c_all = np.append(credits, 0.5)

    def nll(theta: float) -> float:
        return -float(np.sum(w_all * (c_all * -np.logaddexp(0, -theta)
                                      + (1 - c_all) * -np.logaddexp(0, theta))))

    theta = minimize_scalar(nll, bounds=(-20, 20), method="bounded",
                            options={"xatol": 1e-10}).x
    assert router.p_strong(q)[0] == pytest.approx(1 / (1 + np.exp(-theta)), abs=1e-6)


def test_sw_pseudo_count_keeps_one_sided_weights_finite():
    X = np.eye(4)
    y = np.ones(4)
    p = SWRankingRouter(pseudo_count=1.0).fit(X, y).p_strong(X)
    assert np.all(p < 1) and np.all(p > 0.5)
    np.testing.assert_allclose(SWRankingRouter(pseudo_count=0.0).fit(X, y).p_strong(X),
                               np.ones(4), rtol=0, atol=1e-12)


def test_sw_locality_grows_with_gamma():
    X = np.array([[1.0, 0.0], [0.0, 1.0]])
    y = np.array([1.0, 0.0])
    q = np.array([[1.0, 0.2]])
    p_lo = SWRankingRouter(gamma=1.5, pseudo_count=0).fit(X, y).p_strong(q)[0]
    p_hi = SWRankingRouter(gamma=100.0, pseudo_count=0).fit(X, y).p_strong(q)[0]
    assert 0.5 < p_lo < p_hi < 1


def test_knn_uses_nearest_credits():
    X = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    y = ["strong", "tie", "weak"]
    q = np.array([[1.0, 0.01], [0.1, 1.0]])
    np.testing.assert_array_equal(KNNRouter(k=1).fit(X, y).p_strong(q), [1.0, 0.0])
    np.testing.assert_array_equal(KNNRouter(k=2).fit(X, y).p_strong(q), [0.75, 0.25])
    np.testing.assert_allclose(KNNRouter(k=3).fit(X, y).p_strong(q), [0.5, 0.5])


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(np.float64, (5, 4), elements=st.floats(-3, 3)),
    st.sampled_from(["sw", "knn1", "mf", "mlp"]),
)
def test_probabilities_in_unit_interval(fitted_small, Q, name):
    Q = Q + np.array([1e-3, 0, 0, 0])  # avoid all-zero rows (no cosine direction)
    Q[np.linalg.norm(Q, axis=1) == 0] = 1.0
    p = fitted_small[name].p_strong(Q)
    assert p.shape == (5,) and np.all((p >= 0) & (p <= 1))


@pytest.fixture(scope="module")
def fitted_small():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((30, 4))
    y = rng.choice(["strong", "weak", "tie"], 30)
    return {
        "sw": SWRankingRouter().fit(X, y),
        "knn1": KNNRouter().fit(X, y),
        "mf": MatrixFactorizationRouter(dim=4, epochs=20, lr=0.1).fit(X * 10, y),
        "mlp": MLPRouter(hidden=8, epochs=20, lr=0.1).fit(X * 10, y),
    }


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["sw", "knn1", "mf", "mlp"])
def test_predict_before_fit(name):
    with pytest.raises(NotFittedError, match=r"not fitted yet; call fit\(embeddings, labels\)"):
        FACTORIES[name]().p_strong(np.ones((2, 3)))
    with pytest.raises(NotFittedError, match="call fit"):
        FACTORIES[name]().save("never.json")


@pytest.mark.parametrize("name", ["sw", "knn1", "mf", "mlp"])
def test_predict_input_errors(fitted_small, name):
    r = fitted_small[name]
    with pytest.raises(InvalidParameterError, match=r"must have 4 columns.*Got 3"):
        r.p_strong(np.ones((2, 3)))
    with pytest.raises(InvalidParameterError, match=r"'embeddings' parameter.*finite"):
        r.p_strong(np.array([[1.0, np.nan, 0.0, 0.0]]))
    with pytest.raises(InvalidParameterError, match=r"'embeddings' parameter.*2-D"):
        r.p_strong(np.ones(4))


@pytest.mark.parametrize(
    ("router", "X", "y", "exc", "match"),
    [
        (KNNRouter(k=5), np.eye(3), [1, 0, 1], InvalidParameterError,
         r"'k' parameter of KNNRouter must be an int <= the number of training queries \(3\)"),
        (KNNRouter(k=0), np.eye(3), [1, 0, 1], InvalidParameterError, "'k' parameter"),
        (SWRankingRouter(), np.eye(3), ["strong", "x", "tie"], InvalidParameterError,
         "'labels' parameter.*'x' at index 1"),
        (SWRankingRouter(), np.eye(3), [1, 0], InvalidParameterError, "same length"),
        (SWRankingRouter(), np.array([[1.0, np.nan]]), [1], InvalidParameterError,
         "'embeddings' parameter.*finite"),
        (SWRankingRouter(), np.array([[0.0, 0.0], [1.0, 0.0]]), [1, 0], InvalidParameterError,
         "all-zero rows"),
        (SWRankingRouter(gamma=1.0), np.eye(2), [1, 0], InvalidParameterError,
         "'gamma' parameter of SWRankingRouter"),
        (MLPRouter(epochs=0), np.eye(2), [1, 0], InvalidParameterError, "'epochs' parameter"),
        (MatrixFactorizationRouter(dim=2.5), np.eye(2), [1, 0], InvalidTypeError,
         "'dim' parameter"),
        (MatrixFactorizationRouter(model_bias="yes"), np.eye(2), [1, 0], InvalidTypeError,
         "'model_bias' parameter"),
    ],
)
def test_fit_errors(router, X, y, exc, match):
    with pytest.raises(exc, match=match):
        router.fit(X, y)


# ----------------------------------------------------------------------------- embedder


class HashEmbedder:
    """Tiny deterministic text encoder: character codes hashed into a normalised vector."""

    def __init__(self, dim: int = 16, name: str = "hash16"):
        self.dim = dim
        self.name = name
        self.encoded: list[str] = []

    def encode(self, texts):
        self.encoded.extend(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for j, ch in enumerate(t):
                out[i, (ord(ch) * 31 + j) % self.dim] += 1.0
            out[i, 0] += 1e-3
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_query_embedder_without_cache_dedups():
    enc = HashEmbedder()
    qe = QueryEmbedder(enc, batch_size=2)
    out = qe.encode(["a", "bb", "a", "ccc", "dd"])
    assert out.shape == (5, 16) and out.dtype == np.float32
    np.testing.assert_array_equal(out, enc.encode(["a", "bb", "a", "ccc", "dd"]))
    assert enc.encoded[:4] == ["a", "bb", "ccc", "dd"]
    assert qe.name == "hash16"


def test_query_embedder_cache_encodes_only_new_texts(tmp_path):
    cache = tmp_path / "emb.sqlite"
    enc = HashEmbedder()
    first = QueryEmbedder(enc, cache_path=cache).encode(["x", "y"])
    assert enc.encoded == ["x", "y"]
    enc2 = HashEmbedder()
    second = QueryEmbedder(enc2, cache_path=cache).encode(["y", "z", "x"])
    assert enc2.encoded == ["z"]  # persisted across instances; only the new text encoded
    np.testing.assert_array_equal(second[[0, 2]], first[[1, 0]])
    enc3 = HashEmbedder(dim=8, name="other")
    assert QueryEmbedder(enc3, cache_path=cache).encode(["x"]).shape == (1, 8)
    assert enc3.encoded == ["x"]  # cache keyed by embedder name


def test_query_embedder_errors(tmp_path):
    class Bad(HashEmbedder):
        def encode(self, texts):
            return np.ones((len(texts) + 1, 3))

    with pytest.raises(EstimationError, match="shape"):
        QueryEmbedder(Bad()).encode(["a"])
    with pytest.raises(InvalidTypeError, match="'texts' parameter"):
        QueryEmbedder(HashEmbedder()).encode("abc")
    with pytest.raises(InvalidTypeError, match=r"'texts\[1\]' parameter"):
        QueryEmbedder(HashEmbedder()).encode(["a", 3])
    with pytest.raises(InvalidTypeError, match="'embedder' parameter"):
        QueryEmbedder(object()).encode(["a"])
    bad_db = tmp_path / "not.sqlite"
    bad_db.write_text("this is not a database" * 100)
    with pytest.raises(InvalidParameterError, match="'cache_path' parameter"):
        QueryEmbedder(HashEmbedder(), cache_path=bad_db).encode(["a"])


# ----------------------------------------------------------------------------- estimator


@pytest.fixture(scope="module")
def text_router():
    enc = HashEmbedder()
    hard = [f"prove theorem {i} about {w}" for i, w in enumerate("abcdefghij")]
    easy = [f"hi {w}{w}" for w in "abcdefghij"]
    X = enc.encode(hard + easy)
    return KNNRouter(k=1).fit(X, ["strong"] * 10 + ["weak"] * 10), enc


class NoModel:
    name = "must-not-be-called"

    def generate(self, prompts, config):
        raise AssertionError("a query router must not generate")


def test_query_router_estimator_scores_without_model(text_router, tmp_path):
    router, enc = text_router
    est = QueryRouterEstimator(router, embedder=HashEmbedder())
    assert est.needs_generation is False
    assert est.sample_request().greedy is False and est.sample_request().sampling is None
    prompts = ["prove theorem 3 about d", "hi cc", [{"role": "user", "content": "hi aa"}]]
    res = est.estimate(prompts)
    np.testing.assert_array_equal(res.scores, [1.0, 0.0, 0.0])
    assert res.name == "query_router" and all(s.greedy is None for s in res.samples)
    np.testing.assert_array_equal(
        res.scores, router.p_strong(enc.encode(["prove theorem 3 about d", "hi cc",
                                                     "hi aa"])))
    # also through estimate_many with a model that must never be called
    many = estimate_many([est], prompts, NoModel())
    np.testing.assert_array_equal(many["query_router"].scores, res.scores)
    # a saved router path works as well
    router.save(tmp_path / "r.json")
    by_path = QueryRouterEstimator(str(tmp_path / "r.json"), embedder=HashEmbedder())
    np.testing.assert_array_equal(by_path.estimate(prompts).scores, res.scores)
    assert estimator_registry.get_class("query_router") is QueryRouterEstimator


def test_query_router_estimator_errors(text_router):
    with pytest.raises(NotFittedError, match="no router"):
        QueryRouterEstimator(embedder=HashEmbedder()).estimate(["q"])
    with pytest.raises(NotFittedError, match="call fit"):
        QueryRouterEstimator(SWRankingRouter(), embedder=HashEmbedder()).estimate(["q"])
    with pytest.raises(InvalidTypeError, match="'router' parameter"):
        QueryRouterEstimator(42, embedder=HashEmbedder()).estimate(["q"])
    with pytest.raises(InvalidParameterError, match="must have 16 columns"):
        QueryRouterEstimator(text_router[0], embedder=HashEmbedder(dim=8)).estimate(["q"])


# ----------------------------------------------------------------------------- threshold


@pytest.mark.parametrize(
    ("scores", "target", "threshold", "share"),
    [
        ([0.1, 0.2, 0.3, 0.4], 0.5, 0.2, 0.5),
        ([0.1, 0.2, 0.3, 0.4], 0.49, 0.3, 0.25),
        ([0.1, 0.5, 0.5, 0.5, 0.9], 0.4, 0.5, 0.2),  # tie block cannot be split
        ([0.1, 0.5, 0.5, 0.5, 0.9], 0.8, 0.1, 0.8),
        ([0.3, 0.3], 0.0, 0.3, 0.0),
        ([0.3, 0.7], 1.0, -np.inf, 1.0),
        ([0.3] * 10, 0.3, 0.3, 0.0),
    ],
)
def test_threshold_hand_cases(scores, target, threshold, share):
    t, (lo, hi) = threshold_for_cloud_share(scores, target)
    assert t == threshold
    realised = np.mean(np.asarray(scores) > t)
    assert realised == pytest.approx(share)
    assert lo <= realised <= hi


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 8).map(lambda v: v / 8), min_size=1, max_size=40),
    st.floats(0, 1),
    st.floats(0.5, 0.99),
)
def test_threshold_properties(scores, target, confidence):
    s = np.asarray(scores)
    t, (lo, hi) = threshold_for_cloud_share(s, target, confidence)
    share = np.mean(s > t)
    assert share <= target + 1e-9
    # minimality: any lower observed score as threshold would exceed the target
    lower = s[s < t]
    if lower.size:
        assert np.mean(s > lower.max()) > target
    assert 0 <= lo <= share <= hi <= 1


def test_threshold_interval_matches_clopper_pearson_and_narrows():
    from scipy.stats import binomtest

    rng = np.random.default_rng(3)
    s = rng.random(400)
    t, (lo, hi) = threshold_for_cloud_share(s, 0.2, 0.9)
    k = int(np.sum(s > t))
    ci = binomtest(k, 400).proportion_ci(0.9, method="exact")
    assert (lo, hi) == pytest.approx((ci.low, ci.high))
    _, (lo_small, hi_small) = threshold_for_cloud_share(s[:40], 0.2, 0.9)
    assert hi_small - lo_small > hi - lo


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": [0.1], "target_share": 1.5}, "'target_share' parameter"),
        ({"scores": [0.1], "target_share": 0.5, "confidence": 1.0}, "'confidence' parameter"),
        ({"scores": [0.1, np.nan], "target_share": 0.5}, "'scores' parameter.*finite"),
        ({"scores": [], "target_share": 0.5}, "'scores' parameter.*non-empty"),
    ],
)
def test_threshold_errors(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        threshold_for_cloud_share(**kwargs)


@pytest.mark.integration
def test_default_embedder_end_to_end(tmp_path):
    """Real all-MiniLM-L6-v2 from its PyPI package (offline); skipped when not installed."""
    from confroute.errors import MissingDependencyError, ModelLoadError
    from confroute.models.embedded import load_default_embedder

    try:
        enc = load_default_embedder()
    except (MissingDependencyError, ModelLoadError) as exc:
        pytest.skip(f"default embedder unavailable: {exc}")
    qe = QueryEmbedder(enc, cache_path=tmp_path / "c.sqlite")
    hard = ["Prove that there are infinitely many primes.", "Derive the Black-Scholes equation.",
            "Compute the integral of x^2 e^x dx.", "Explain the proof of Fermat's last theorem."]
    easy = ["Hi there!", "What colour is the sky?", "Say hello.", "What is 1+1?"]
    X = qe.encode(hard + easy)
    assert X.shape == (8, enc.dimension)
    router = SWRankingRouter().fit(X, ["strong"] * 4 + ["weak"] * 4)
    scores = QueryRouterEstimator(router, embedder=qe).estimate(
        ["Prove that the square root of 2 is irrational.", "Hello, how are you?"]).scores
    assert scores[0] > 0.5 > scores[1]


@pytest.mark.parametrize("name", ["sw", "knn1", "knn5"])
def test_blocked_similarity_equals_one_block(fitted, planted, monkeypatch, name):
    import confroute.predictive.routers as mod

    X_te = planted[2][:50]
    whole = fitted[name].p_strong(X_te)
    monkeypatch.setattr(mod, "_BLOCK_ELEMENTS", 7 * 300)  # 7 query rows per block
    np.testing.assert_allclose(fitted[name].p_strong(X_te), whole, rtol=0, atol=1e-12)
