"""GenerationCache and CachedModel: exact round trips, hits, misses, corruption, resume."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from confroute.cache import CachedModel, GenerationCache, decode_samples, encode_samples
from confroute.errors import SerializationError
from confroute.types import GenerationConfig, Prompt, Sample, prompt_text

GREEDY = GenerationConfig(max_new_tokens=8)
SAMPLED = GenerationConfig(max_new_tokens=8, temperature=0.7, n=3, seed=1)


class CountingModel:
    """A deterministic model that counts its calls and the prompts it was asked."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.name = "counting"
        self.batch_size = 2
        self.n_calls = 0
        self.asked: list[str] = []
        self.fail_after = fail_after

    def generate(self, prompts: Sequence[Prompt], config: GenerationConfig
                 ) -> list[list[Sample]]:
        if self.fail_after is not None and self.n_calls >= self.fail_after:
            raise RuntimeError("interrupted")
        self.n_calls += 1
        out = []
        for p in prompts:
            text = prompt_text(p)
            self.asked.append(text)
            lp = -np.linspace(0.1, 1.0, 4).astype(np.float32) / (1 + len(text))
            out.append([Sample(text=f"{text}:{k}", token_ids=(1, 2, 3, len(text)),
                               token_logprobs=lp, token_entropies=-lp * 3,
                               finish_reason="length", prompt_tokens=len(text))
                        for k in range(config.n)])
        return out


def _same(a: Sample, b: Sample) -> None:
    assert a.text == b.text and a.token_ids == b.token_ids
    assert a.finish_reason == b.finish_reason and a.prompt_tokens == b.prompt_tokens
    for x, y in ((a.token_logprobs, b.token_logprobs), (a.token_entropies, b.token_entropies)):
        if x is None:
            assert y is None
        else:
            assert y is not None and y.dtype == np.float32
            np.testing.assert_array_equal(np.asarray(x, dtype=np.float32), y)


def test_encode_decode_round_trip_is_exact() -> None:
    rng = np.random.default_rng(0)
    samples = [
        Sample(text="Paris ✓", token_ids=(5, 6, 7), token_logprobs=rng.normal(size=3)
               .astype(np.float32), token_entropies=rng.random(3).astype(np.float32),
               finish_reason="stop", prompt_tokens=11),
        Sample(text="", finish_reason="error"),
    ]
    back = decode_samples(encode_samples(samples))
    assert len(back) == 2
    for a, b in zip(samples, back):
        _same(a, b)


@pytest.mark.parametrize("prompt", ["What is 2 + 2?",
                                    [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "hello"}]])
def test_cache_put_get_round_trip(tmp_path: Path, prompt: Prompt) -> None:
    cache = GenerationCache(tmp_path / "c.sqlite")
    samples = CountingModel().generate([prompt], SAMPLED)[0]
    cache.put("m", prompt, samples, SAMPLED, seconds=0.25)
    got = cache.get("m", prompt, SAMPLED)
    assert got is not None
    back, seconds = got
    assert seconds == 0.25
    for a, b in zip(samples, back):
        _same(a, b)
    assert cache.get("other-model", prompt, SAMPLED) is None
    assert cache.get("m", prompt, GREEDY) is None


def test_second_call_does_not_call_the_model(tmp_path: Path) -> None:
    inner = CountingModel()
    cached = CachedModel(inner, GenerationCache(tmp_path / "c.sqlite"))
    prompts = ["a", "b", "c"]
    first = cached.generate(prompts, SAMPLED)
    calls = inner.n_calls
    assert calls == 2  # chunks of batch_size 2
    second = cached.generate(prompts, SAMPLED)
    assert inner.n_calls == calls
    for x, y in zip(first, second):
        for a, b in zip(x, y):
            _same(a, b)
    assert cached.calls[-1].n_hits == 3
    # a new prompt generates only the missing one, in one call
    cached.generate(["a", "d"], SAMPLED)
    assert inner.n_calls == calls + 1 and inner.asked[-1] == "d"


def test_different_config_is_a_miss(tmp_path: Path) -> None:
    inner = CountingModel()
    cached = CachedModel(inner, GenerationCache(tmp_path / "c.sqlite"))
    cached.generate(["a"], GREEDY)
    cached.generate(["a"], GenerationConfig(max_new_tokens=9))
    cached.generate(["a"], SAMPLED)
    assert inner.n_calls == 3
    cached.generate(["a"], GREEDY)
    assert inner.n_calls == 3


def test_new_connection_sees_stored_rows(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    CachedModel(CountingModel(), GenerationCache(path)).generate(["a", "b"], GREEDY)
    inner = CountingModel()
    CachedModel(inner, GenerationCache(path)).generate(["b", "a"], GREEDY)
    assert inner.n_calls == 0


def _corrupt(path: Path, payload: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("UPDATE generations SET samples = ?", (payload,))
    conn.commit()
    conn.close()


@pytest.mark.parametrize("payload", [
    "{not json",
    '{"v": 1, "samples": [{"text": 3}]}',
    '{"v": 99, "samples": []}',
    '{"v": 1, "samples": [{"text": "x", "token_ids": [1, 2], "token_logprobs": "AAAA", '
    '"token_entropies": null, "finish_reason": "stop", "prompt_tokens": null}]}',
    '{"v": 1, "samples": []}',
])
def test_corrupted_row_is_recomputed_or_raises(tmp_path: Path, payload: str) -> None:
    path = tmp_path / "c.sqlite"
    CachedModel(CountingModel(), GenerationCache(path)).generate(["a"], GREEDY)
    _corrupt(path, payload)
    strict = GenerationCache(path, on_corrupt="raise")
    with pytest.raises(SerializationError):
        strict.get("counting", "a", GREEDY)
    inner = CountingModel()
    cache = GenerationCache(path)
    out = CachedModel(inner, cache).generate(["a"], GREEDY)
    assert inner.n_calls == 1 and cache.n_corrupt == 1 and out[0][0].text == "a:0"
    # the row was overwritten with a good one
    assert GenerationCache(path, on_corrupt="raise").get("counting", "a", GREEDY) is not None


def test_interrupted_run_resumes_without_recomputing(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    failing = CountingModel(fail_after=1)  # the second chunk fails
    with pytest.raises(RuntimeError, match="interrupted"):
        CachedModel(failing, GenerationCache(path)).generate(["a", "b", "c", "d"], GREEDY)
    inner = CountingModel()
    CachedModel(inner, GenerationCache(path)).generate(["a", "b", "c", "d"], GREEDY)
    assert inner.asked == ["c", "d"]


def test_duplicate_prompts_in_one_call_are_generated_once(tmp_path: Path) -> None:
    inner = CountingModel()
    out = CachedModel(inner, GenerationCache(tmp_path / "c.sqlite")).generate(
        ["a", "a", "b"], GREEDY)
    assert inner.asked == ["a", "b"] and out[0][0].text == out[1][0].text == "a:0"


def test_threads_share_one_cache(tmp_path: Path) -> None:
    cache = GenerationCache(tmp_path / "c.sqlite")
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            CachedModel(CountingModel(), cache).generate([f"p{k}-{i}" for i in range(5)],
                                                         GREEDY)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(cache) == 30


def test_real_tiny_model_round_trip(tmp_path: Path, tiny_llama) -> None:  # type: ignore[no-untyped-def]
    from confroute.models.hf import HFLanguageModel

    model, tok = tiny_llama
    lm = HFLanguageModel(model, tok, device="cpu", name="tiny")
    calls = {"n": 0}
    real_generate = lm.generate

    def counting(prompts, config):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real_generate(prompts, config)

    lm.generate = counting  # type: ignore[method-assign]
    cached = CachedModel(lm, GenerationCache(tmp_path / "c.sqlite"))
    cfg = GenerationConfig(max_new_tokens=5, temperature=1.0, n=2, seed=0)
    first = cached.generate(["hello world", "The capital of France is"], cfg)
    assert calls["n"] == 1
    again = CachedModel(lm, GenerationCache(tmp_path / "c.sqlite")).generate(
        ["hello world", "The capital of France is"], cfg)
    assert calls["n"] == 1
    for x, y in zip(first, again):
        for a, b in zip(x, y):
            _same(a, b)


def test_score_passes_through_and_bad_arguments() -> None:
    class Scorer(CountingModel):
        def score(self, prompts, continuations):  # type: ignore[no-untyped-def]
            return [np.zeros(2) for _ in prompts]

    cache = GenerationCache(":memory:")
    assert len(CachedModel(Scorer(), cache).score(["a"], ["b"])) == 1
    with pytest.raises(AttributeError, match="no 'score'"):
        CachedModel(CountingModel(), cache).score(["a"], ["b"])
    with pytest.raises(TypeError):
        CachedModel(object(), cache)
    with pytest.raises(TypeError):
        CachedModel(CountingModel(), "not a cache")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_corrupt"):
        GenerationCache(":memory:", on_corrupt="ignore")
