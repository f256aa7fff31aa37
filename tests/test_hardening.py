"""Hardening (issue 13): atomic saves, defensive loading, signed files, safe paths,
and a verbalized-confidence parser that only reads a strict final line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confroute import (
    ConfrouteError,
    InvalidParameterError,
    InvalidTypeError,
    Router,
    Sample,
    Samples,
    SerializationError,
)
from confroute._serialization import read_file, write_atomic, write_file
from confroute.calibration import IsotonicCalibrator, PlattCalibrator
from confroute.estimators import VerbalizedConfidence, parse_confidence
from confroute.policies import BudgetPolicy

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers
def _fitted(calibrator: str = "isotonic", policy: Any = "threshold") -> Router:
    rng = np.random.default_rng(0)
    n = 120
    prompts = [f"question {i}" for i in range(n)]
    nll = rng.uniform(0.0, 3.0, size=n)
    labels = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(3.0 * (nll - 1.5)))).astype(int)
    samples = [
        Samples(prompt=p, greedy=Sample(text=f"answer {i}", token_logprobs=np.full(3, -v),
                                        token_entropies=np.full(3, 1.5 * v)))
        for i, (p, v) in enumerate(zip(prompts, nll))
    ]
    router = Router("sequence_logprob", calibrator, policy)
    router.calibrate(prompts, labels, samples=samples)
    return router


@pytest.fixture(scope="module")
def saved_doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("doc") / "router.json"
    _fitted(policy=BudgetPolicy(max_cloud_fraction=0.3)).save(path)
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def _sha(payload: Any) -> str:
    """The file checksum, recomputed as a forger would."""
    canon = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode("ascii")).hexdigest()


def _forge(path: Path, doc: dict[str, Any]) -> Path:
    doc = dict(doc)
    doc["sha256"] = _sha(doc["payload"])
    path.write_text(json.dumps(doc))
    return path


def _calibrator_state(doc: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = doc["payload"]["calibrator"]["state"]
    return state


def _temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.confroute-tmp"))


# ----------------------------------------------------------------------------- atomic writes
def test_concurrent_saves_and_loads_never_tear(tmp_path: Path) -> None:
    router = _fitted()
    path = tmp_path / "router.json"
    router.save(path)
    errors: list[BaseException] = []
    loads = [0]
    done = threading.Event()

    def saver() -> None:
        try:
            for _ in range(50):
                router.save(path)
        except BaseException as exc:  # collected: any error fails the test
            errors.append(exc)

    def loader() -> None:
        try:
            while not done.is_set():
                assert Router.load(path).calibration_ == router.calibration_
                loads[0] += 1
        except BaseException as exc:
            errors.append(exc)

    savers = [threading.Thread(target=saver) for _ in range(4)]
    loaders = [threading.Thread(target=loader) for _ in range(2)]
    for t in savers + loaders:
        t.start()
    for t in savers:
        t.join()
    done.set()
    for t in loaders:
        t.join()
    assert errors == []
    assert loads[0] > 0
    assert _temps(tmp_path) == []


_KILL_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from confroute._serialization import write_file
    path, tag = sys.argv[1], int(sys.argv[2])
    big = np.random.default_rng(tag).normal(size=400_000)
    i = 0
    while True:
        write_file(path, "router", {"round": tag, "i": i, "big": big})
        if i == 0:
            print("ready", flush=True)
        i += 1
""")


def test_killed_saves_never_leave_an_unreadable_target(tmp_path: Path) -> None:
    path = tmp_path / "router.json"
    write_file(path, "router", {"round": -1})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(13)
    for rnd in range(10):
        proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(path), str(rnd)],
                                stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        data = read_file(path, "router")  # always a whole file, old or new
        assert data["round"] == rnd and data["big"].shape == (400_000,)
    # A killed writer may leave its temporary; a later save removes it once stale.
    planted = tmp_path / ".router.json.abc123.confroute-tmp"
    planted.write_bytes(b"partial")
    fresh = tmp_path / ".router.json.def456.confroute-tmp"
    fresh.write_bytes(b"another writer, still working")
    old = time.time() - 3600
    for p in _temps(tmp_path):
        if p != fresh:
            os.utime(p, (old, old))
    write_file(path, "router", {"round": 99})
    assert _temps(tmp_path) == [fresh]
    assert read_file(path, "router") == {"round": 99}


def test_write_failure_removes_the_temporary(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SerializationError, match="Cannot save a value"):
        write_file(tmp_path / "x.json", "router", {"bad": object()})
    with pytest.raises(InvalidTypeError, match="'data' parameter of write_atomic"):
        write_atomic(tmp_path / "y.json", 123)  # type: ignore[arg-type]
    write_atomic(tmp_path / "z.json", "old")

    def full_disk(src: object, dst: object) -> None:  # fault injection only
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(SerializationError, match=r"'path'.*No space left on device"):
        write_atomic(tmp_path / "z.json", "new")
    monkeypatch.undo()
    assert _temps(tmp_path) == [] and not (tmp_path / "y.json").exists()
    assert (tmp_path / "z.json").read_text() == "old"


@pytest.mark.parametrize(
    ("target", "exc", "match"),
    [
        (".", InvalidParameterError, "'path' parameter of router save must be a file path, not"),
        ("file.txt/router.json", SerializationError, "'path' parameter.*writable location"),
        ("", InvalidParameterError, "'path' parameter.*non-empty"),
    ],
)
def test_save_to_a_bad_path_is_a_typed_error(
    tmp_path: Path, target: str, exc: type[Exception], match: str
) -> None:
    (tmp_path / "file.txt").write_text("x")
    router = _fitted()
    arg = "" if target == "" else tmp_path / target
    with pytest.raises(exc, match=match):
        router.save(arg)
    with pytest.raises(InvalidTypeError, match="'path' parameter of router save"):
        router.save(42)  # type: ignore[arg-type]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root can write into read-only directories")
def test_save_into_a_read_only_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(SerializationError, match=r"'path' parameter.*writable"):
            _fitted().save(ro / "router.json")
    finally:
        ro.chmod(0o700)


# ----------------------------------------------------------------------------- defensive loads
@pytest.mark.parametrize("bad", [123, None, b"router.json", ["router.json"]])
def test_load_refuses_a_non_path(bad: Any) -> None:
    with pytest.raises(InvalidTypeError, match="'path' parameter of router load must be a str"):
        Router.load(bad)


def test_load_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError, match=r"'path'.*not a directory"):
        Router.load(tmp_path)


def test_deeply_nested_json_is_refused_before_parsing(tmp_path: Path,
                                                      saved_doc: dict[str, Any]) -> None:
    raw = tmp_path / "raw.json"
    raw.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(SerializationError, match="nests JSON 200000 levels"):
        Router.load(raw)
    doc = json.loads(json.dumps(saved_doc))
    deep: Any = 0
    for _ in range(100):
        deep = {"a": [deep]}
    doc["payload"]["calibration"]["deep"] = deep
    with pytest.raises(SerializationError, match="at most 64"):
        Router.load(_forge(tmp_path / "deep.json", doc))
    # brackets inside strings do not count
    doc = json.loads(json.dumps(saved_doc))
    doc["payload"]["calibration"]["note"] = "[" * 1000
    Router.load(_forge(tmp_path / "str.json", doc))


def test_size_cap(tmp_path: Path) -> None:
    path = tmp_path / "router.json"
    _fitted().save(path)
    size = path.stat().st_size
    with pytest.raises(SerializationError, match=f"larger than max_bytes={size - 1}"):
        read_file(path, "router", max_bytes=size - 1)
    assert read_file(path, "router", max_bytes=size)
    with pytest.raises(InvalidParameterError, match="'max_bytes' parameter"):
        read_file(path, "router", max_bytes=0)


@pytest.mark.parametrize(
    ("shape", "match"),
    [([-1], "invalid shape"), ([2**62, 2**62], "truncated"), ([1.5], "invalid shape"),
     ([True], "invalid shape"), ("3", "invalid shape"), ([1] * 40, "invalid shape"),
     ([0], "truncated")],
)
def test_array_shapes_are_checked_before_allocation(
    tmp_path: Path, saved_doc: dict[str, Any], shape: Any, match: str
) -> None:
    doc = json.loads(json.dumps(saved_doc))
    _calibrator_state(doc)["X_thresholds_"]["__ndarray__"]["shape"] = shape
    with pytest.raises(SerializationError, match=match):
        Router.load(_forge(tmp_path / "r.json", doc))


@pytest.mark.parametrize(
    ("spec", "match"),
    [({"dtype": "object", "shape": [1], "data": ""}, "disallowed dtype"),
     ({"dtype": "float64", "shape": [1], "data": 5}, "base64 string"),
     ({"dtype": "float64", "shape": [1], "data": "!!!!!!!!!!!="}, "Malformed array data"),
     ({"dtype": "float64", "shape": [1]}, "exactly dtype, shape and data"),
     ([1, 2], "exactly dtype, shape and data")],
)
def test_array_specs_are_checked(
    tmp_path: Path, saved_doc: dict[str, Any], spec: Any, match: str
) -> None:
    doc = json.loads(json.dumps(saved_doc))
    _calibrator_state(doc)["X_thresholds_"]["__ndarray__"] = spec
    with pytest.raises(SerializationError, match=match):
        Router.load(_forge(tmp_path / "r.json", doc))


@pytest.mark.parametrize(
    ("where", "value", "match"),
    [
        (("edge_max_new_tokens",), math.inf, "incomplete"),
        (("calibrator", "state", "n_features_in_"), math.inf, "n_features_in_"),
        (("calibrator", "state", "n_features_in_"), -1, "n_features_in_"),
        (("policy", "state", "n_calibration_"), math.inf, "n_calibration_"),
        (("policy", "state", "threshold_"), math.nan, "threshold_"),
        (("policy", "state", "threshold_"), 7.0, "threshold_"),
        (("policy", "params", "max_cloud_fraction"), math.inf, "max_cloud_fraction"),
        (("estimators", 0, "params", "max_new_tokens"), math.nan, "finite"),
        (("calibrator", "params", "y_max"), -math.inf, "y_max"),
    ],
)
def test_non_finite_and_out_of_range_values_are_refused(
    tmp_path: Path, saved_doc: dict[str, Any], where: tuple[Any, ...], value: Any, match: str
) -> None:
    doc = json.loads(json.dumps(saved_doc))
    node = doc["payload"]
    for key in where[:-1]:
        node = node[key]
    assert where[-1] in node
    node[where[-1]] = value
    with pytest.raises(SerializationError, match=match):
        Router.load(_forge(tmp_path / "r.json", doc))


def _array(values: list[float]) -> dict[str, Any]:
    from confroute._serialization import encode

    out: dict[str, Any] = encode(np.asarray(values, dtype=np.float64))
    return out


@pytest.mark.parametrize(
    ("key", "values", "match"),
    [
        ("y_thresholds_", "nan", "y_thresholds_"),
        ("y_thresholds_", "seven", "y_thresholds_"),
        ("y_thresholds_", "wrong_way", "monotone"),
        ("X_thresholds_", "nan", "X_thresholds_"),
        ("X_thresholds_", "unsorted", "increasing"),
    ],
)
def test_isotonic_state_is_range_checked(
    tmp_path: Path, saved_doc: dict[str, Any], key: str, values: str, match: str
) -> None:
    doc = json.loads(json.dumps(saved_doc))
    state = _calibrator_state(doc)
    n = state["X_thresholds_"]["__ndarray__"]["shape"][0]
    assert n >= 3
    ramp = np.linspace(0.1, 0.9, n)
    new = {"nan": np.where(np.arange(n) == 1, np.nan, ramp), "seven": np.full(n, 7.0),
           "wrong_way": ramp if not state["increasing_"] else ramp[::-1],
           "unsorted": ramp[::-1]}[values]
    state[key] = _array(list(new))
    with pytest.raises(SerializationError, match=match):
        Router.load(_forge(tmp_path / "r.json", doc))


def test_platt_state_must_be_finite() -> None:
    cal = PlattCalibrator().fit([0.1, 0.5, 0.9, 0.2], [1, 0, 0, 1])
    state = cal.get_state()
    state["intercept_"] = math.inf
    with pytest.raises(SerializationError, match="intercept_"):
        PlattCalibrator().set_state(state)
    state = cal.get_state()
    state["coef_"] = np.array([math.nan])
    with pytest.raises(SerializationError, match="coef_"):
        PlattCalibrator().set_state(state)
    iso = IsotonicCalibrator().fit([0.1, 0.5, 0.9, 0.2], [1, 0, 0, 1])
    assert IsotonicCalibrator().set_state(iso.get_state()).p_good([0.3]).shape == (1,)


@pytest.mark.parametrize("standardize", [True, False])
def test_platt_on_extreme_scores_stays_finite(standardize: bool) -> None:
    scores = [1e308, -1e308, 1.7e308, -1.7e308, 5.0, -5.0, 0.0, 1.0]
    labels = [1, 0, 1, 0, 1, 0, 1, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # L-BFGS may not fully converge
        cal = PlattCalibrator(standardize=standardize).fit(scores, labels)
    p = cal.p_good([*scores, 1.79e308, -1.79e308])
    assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    assert np.isfinite(cal.coef_).all() and math.isfinite(cal.intercept_)


# ----------------------------------------------------------------------------- signatures
def test_signed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "signed.json"
    write_file(path, "router", {"x": 1}, signing_key="k1")
    assert read_file(path, "router", signing_key="k1") == {"x": 1}
    assert read_file(path, "router") == {"x": 1}  # no key known: checksum only
    with pytest.raises(SerializationError, match="signature check"):
        read_file(path, "router", signing_key=b"other key")
    doc = json.loads(path.read_text())
    doc["payload"]["x"] = 2
    _forge(path, doc)  # checksum recomputed: only the HMAC can tell
    assert read_file(path, "router") == {"x": 2}
    with pytest.raises(SerializationError, match="signature check"):
        read_file(path, "router", signing_key="k1")
    unsigned = tmp_path / "unsigned.json"
    write_file(unsigned, "router", {"x": 1})
    with pytest.raises(SerializationError, match="not signed"):
        read_file(unsigned, "router", signing_key="k1")
    with pytest.raises(InvalidTypeError, match="'signing_key' parameter"):
        read_file(unsigned, "router", signing_key=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="'signing_key' parameter"):
        write_file(unsigned, "router", {"x": 1}, signing_key="")


def test_signing_key_from_the_environment(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    router = _fitted()
    plain = tmp_path / "plain.json"
    router.save(plain)
    monkeypatch.setenv("CONFROUTE_SIGNING_KEY", "secret")
    signed = tmp_path / "signed.json"
    router.save(signed)
    assert "hmac_sha256" in json.loads(signed.read_text())
    Router.load(signed)
    with pytest.raises(SerializationError, match="not signed"):
        Router.load(plain)
    doc = json.loads(signed.read_text())
    doc["payload"]["policy"]["params"]["min_p_good"] = 0.01
    with pytest.raises(SerializationError, match="signature check"):
        Router.load(_forge(signed, doc))


# ----------------------------------------------------------------------------- model paths
def test_gguf_file_cannot_leave_the_model_folder(tmp_path: Path) -> None:
    from confroute.models.hf import HFLanguageModel

    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.gguf").write_bytes(b"x")
    for name in ("../../../etc/passwd", "../outside.gguf", "/etc/passwd", "."):
        with pytest.raises(InvalidParameterError, match="'gguf_file' parameter of HFLanguage"):
            HFLanguageModel(folder, gguf_file=name, device="cpu")
    (folder / "link.gguf").symlink_to(tmp_path / "outside.gguf")
    with pytest.raises(InvalidParameterError, match=r"'gguf_file'.*inside the model folder"):
        HFLanguageModel(folder, gguf_file="link.gguf", device="cpu")


def test_names_inside_the_folder_are_accepted(tmp_path: Path) -> None:
    from confroute._validation import check_path_within

    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    got = check_path_within("sub/../sub/m.gguf", folder, "gguf_file", "HFLanguageModel")
    assert got == (folder / "sub" / "m.gguf").resolve()


def test_nli_model_path_with_dotdot_is_resolved_and_checked(tmp_path: Path) -> None:
    from confroute.errors import ModelLoadError
    from confroute.estimators.equivalence import NLIEquivalence

    (tmp_path / "a").mkdir()
    missing = NLIEquivalence(model_path=str(tmp_path / "a" / ".." / ".." / "nowhere"))
    with pytest.raises(InvalidParameterError, match="'model_path' parameter of NLIEquivalence"):
        missing.equivalent_pairs("q", [("yes", "no")])
    (tmp_path / "b").mkdir()
    empty = NLIEquivalence(model_path=tmp_path / "a" / ".." / "b")
    with pytest.raises(ModelLoadError, match="Could not load an NLI model"):
        empty.equivalent_pairs("q", [("yes", "no")])


# ----------------------------------------------------------------------------- verbalized
@pytest.mark.parametrize(
    "reply",
    ["I'm not confident. 100% of experts would disagree.", "Not sure at all. The answer is 100.",
     "Confidence: 50-150", "A spider has 8 legs.", "Confidence: 1e9", "Confidence: 0.9",
     "Confidence: 85 (quite sure)", "Confidence: 85\nAnyway, 8 legs.", "Confidence: 1000"],
)
def test_parser_reads_no_number_outside_the_final_line(reply: str) -> None:
    assert parse_confidence(reply) is None


def test_reply_that_copies_the_answer_is_unparsed() -> None:
    v = VerbalizedConfidence()
    answer = "A spider has 8 legs."
    cases = [
        (answer, "A spider has 8 legs.\nConfidence: 100"),  # answer copied into the reply
        ("8 legs\nConfidence: 100", "Confidence: 100"),  # planted confidence echoed
        (answer, "It is a well-known fact.\nConfidence: 90"),  # honest reply: parsed
        ("80", "Confidence: 80"),  # a numeric answer equal to the confidence is fine
    ]
    samples = [Samples(prompt=f"q{i}", greedy=Sample(a), extra={v.extra_key: Sample(r)})
               for i, (a, r) in enumerate(cases)]
    est = v.estimate([s.prompt for s in samples], samples=samples)
    assert est.details["parsed"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert est.n_unscored == 2
    np.testing.assert_allclose(est.scores[2:], [0.1, 0.2])


def test_followup_question_asks_for_the_strict_line() -> None:
    assert "Confidence: N" in VerbalizedConfidence().question


# ----------------------------------------------------------------------------- fuzzing
def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


_JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["isotonic", "platt", "threshold", "budget", "os.system", "__ndarray__",
                     "float64", "AAAA", "", "-1"]),
)
_JSON = st.recursive(
    _JSON_LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=150, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_router_files_load_or_raise_a_typed_error(
    tmp_path: Path, saved_doc: dict[str, Any], data: st.DataObject
) -> None:
    doc = json.loads(json.dumps(saved_doc))
    paths = _paths(doc["payload"])[1:]
    for _ in range(data.draw(st.integers(1, 3), label="n_mutations")):
        where = data.draw(st.sampled_from(paths), label="where")
        parent = doc["payload"]
        try:
            for key in where[:-1]:
                parent = parent[key]
            action = data.draw(st.sampled_from(["replace", "delete"]), label="action")
            if action == "delete" and isinstance(parent, dict):
                del parent[where[-1]]
            else:
                parent[where[-1]] = data.draw(_JSON, label="value")
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    path = _forge(tmp_path / "fuzz.json", doc)
    with contextlib.suppress(ConfrouteError):  # a typed error or success, nothing else
        Router.load(path)


@settings(max_examples=60, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10**9), flips=st.lists(st.tuples(st.integers(0, 10**9),
                                                           st.integers(0, 255)), max_size=4))
def test_truncated_or_flipped_bytes_raise_a_typed_error(
    tmp_path: Path, saved_doc: dict[str, Any], cut: int, flips: list[tuple[int, int]]
) -> None:
    blob = bytearray(json.dumps(saved_doc).encode())
    for pos, byte in flips:
        blob[pos % len(blob)] = byte
    blob = blob[: len(blob) - cut % 50] if cut % 3 else blob
    path = tmp_path / "bytes.json"
    path.write_bytes(bytes(blob))
    with contextlib.suppress(ConfrouteError):
        Router.load(path)


def test_router_save_and_load_thread_the_signing_key(tmp_path: Path) -> None:
    """Router.save(signing_key=...) signs; Router.load with the key refuses an unsigned file."""
    from confroute import Router
    from confroute.errors import SerializationError

    router = Router("sequence_logprob", "isotonic", "threshold")
    router.calibrator.fit(np.array([0.1, 0.2, 0.8, 0.9]), np.array([1, 1, 0, 0]))
    router.policy.fit(router.calibrator.p_good(np.array([0.1, 0.9])))
    router.calibration_ = {"n": 4}
    signed, unsigned = tmp_path / "signed.json", tmp_path / "unsigned.json"
    router.save(signed, signing_key="k1")
    router.save(unsigned)
    assert Router.load(signed, signing_key="k1").calibration_ == {"n": 4}
    with pytest.raises(SerializationError):
        Router.load(unsigned, signing_key="k1")
    with pytest.raises(SerializationError):
        Router.load(signed, signing_key="other")
    with pytest.raises(SerializationError):
        Router.load(signed, max_bytes=10)
