"""Semantic equivalence of generated answers, and greedy clustering by it.

An :class:`Equivalence` decides, for pairs of answers to the same question,
whether they mean the same thing. :meth:`Equivalence.cluster` groups answers
into meaning classes with the greedy procedure of Kuhn et al. [1]_: each new
answer is compared with the first member (representative) of every existing
cluster and joins the first cluster it is equivalent to, else founds a new one.

Backends: :class:`NLIEquivalence` (bidirectional entailment with any local
sequence-classification NLI model), :class:`EmbeddingEquivalence` (cosine
similarity of sentence embeddings) and :class:`ExactMatchEquivalence` (equal
extracted answers).

References
----------
.. [1] Kuhn, Gal and Farquhar, "Semantic Uncertainty: Linguistic Invariances for
   Uncertainty Estimation in Natural Language Generation", ICLR 2023.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from confroute._params import ParamsMixin
from confroute._registry import Registry
from confroute._validation import (
    check_choice,
    check_existing_dir,
    check_float,
    check_int,
    param_error,
)
from confroute.errors import EstimationError, InvalidParameterError, ModelLoadError
from confroute.estimators.answers import get_extractor, normalize_answer

__all__ = [
    "EmbeddingEquivalence",
    "Equivalence",
    "ExactMatchEquivalence",
    "NLIEquivalence",
    "equivalence_registry",
    "resolve_equivalence",
]


class Equivalence(ParamsMixin, ABC):
    """Decides whether two answers to one question are semantically equivalent.

    Subclasses implement :meth:`_equivalent_batch`; batching across pairs and
    prompts, the identical-text shortcut and the check counter live here.

    Attributes
    ----------
    last_n_checks : int
        Number of pairs sent to the backend by the last :meth:`cluster`,
        :meth:`cluster_many` or :meth:`equivalent_pairs` call (pairs whose
        normalised texts are identical are decided without a check).
    """

    last_n_checks: int = 0

    @property
    def name(self) -> str:
        return str(getattr(type(self), "_registry_name", type(self).__name__))

    @abstractmethod
    def _equivalent_batch(
        self, questions: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> np.ndarray:
        """Equivalence of ``first[i]`` and ``second[i]`` as answers to ``questions[i]``.

        Returns
        -------
        ndarray of bool, shape (n_pairs,)
        """

    def _check(
        self, questions: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> np.ndarray:
        out = np.zeros(len(first), dtype=bool)
        todo = []
        for i, (a, b) in enumerate(zip(first, second)):
            if normalize_answer(a) == normalize_answer(b):
                out[i] = True
            else:
                todo.append(i)
        if todo:
            res = np.asarray(
                self._equivalent_batch(
                    [questions[i] for i in todo], [first[i] for i in todo],
                    [second[i] for i in todo],
                ),
                dtype=bool,
            )
            if res.shape != (len(todo),):
                raise EstimationError(
                    f"{type(self).__name__} returned {res.shape} decisions for {len(todo)} pairs."
                )
            out[todo] = res
        self.last_n_checks += len(todo)
        return out

    def equivalent_pairs(self, question: str, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Decide equivalence for a batch of answer pairs to one question.

        Parameters
        ----------
        question : str
        pairs : sequence of (str, str), length n_pairs

        Returns
        -------
        ndarray of bool, shape (n_pairs,)
        """
        self.last_n_checks = 0
        if len(pairs) == 0:
            return np.zeros(0, dtype=bool)
        first = [str(a) for a, _ in pairs]
        second = [str(b) for _, b in pairs]
        return self._check([question] * len(pairs), first, second)

    def cluster(self, question: str, texts: Sequence[str]) -> list[int]:
        """Cluster the answers to one question by meaning.

        Parameters
        ----------
        question : str
        texts : sequence of str, length n_texts

        Returns
        -------
        list of int, length n_texts
            Cluster id of each text; ids are 0, 1, ... in order of first appearance.
        """
        return self.cluster_many([question], [texts])[0]

    def cluster_many(
        self, questions: Sequence[str], texts: Sequence[Sequence[str]]
    ) -> list[list[int]]:
        """Cluster the answers of several prompts, batching the checks of one step.

        Step *t* places the *t*-th answer of every prompt: all its comparisons
        with the representatives of the clusters of its prompt are sent to the
        backend in a single call. A text whose normalised form equals that of an
        earlier text joins that text's cluster without a check.

        Parameters
        ----------
        questions : sequence of str, length n_prompts
        texts : sequence of sequence of str, length n_prompts

        Returns
        -------
        list of list of int
            Cluster ids per prompt (see :meth:`cluster`).
        """
        if len(questions) != len(texts):
            raise InvalidParameterError(
                f"The inputs of {type(self).__name__}.cluster_many must have the same length: "
                f"'questions' has {len(questions)}, 'texts' has {len(texts)}."
            )
        self.last_n_checks = 0
        self._prepare([str(t) for group in texts for t in group])
        try:
            return self._cluster_steps(questions, texts)
        finally:
            self._release()

    def _prepare(self, texts: Sequence[str]) -> None:
        """Called with every text before a clustering; backends may precompute here."""

    def _release(self) -> None:
        """Called after a clustering; drop what :meth:`_prepare` kept."""

    def _cluster_steps(
        self, questions: Sequence[str], texts: Sequence[Sequence[str]]
    ) -> list[list[int]]:
        labels: list[list[int]] = [[] for _ in texts]
        reps: list[list[str]] = [[] for _ in texts]  # representative text per cluster
        seen: list[dict[str, int]] = [{} for _ in texts]  # normalised text -> id
        max_len = max((len(t) for t in texts), default=0)
        for step in range(max_len):
            qs: list[str] = []
            firsts: list[str] = []
            seconds: list[str] = []
            owners: list[tuple[int, int]] = []  # (prompt, cluster id) of each pending pair
            pending: list[int] = []
            for p, group in enumerate(texts):
                if step >= len(group):
                    continue
                text = str(group[step])
                norm = normalize_answer(text)
                if norm in seen[p]:
                    labels[p].append(seen[p][norm])
                    continue
                pending.append(p)
                labels[p].append(-1)
                for c, rep in enumerate(reps[p]):
                    qs.append(questions[p])
                    firsts.append(rep)
                    seconds.append(text)
                    owners.append((p, c))
            decisions = (
                self._check(qs, firsts, seconds) if firsts else np.zeros(0, dtype=bool)
            )
            joined: dict[int, int] = {}
            for (p, c), same in zip(owners, decisions):
                if same and p not in joined:  # first (oldest) equivalent cluster wins
                    joined[p] = c
            for p in pending:
                text = str(texts[p][step])
                if p in joined:
                    labels[p][step] = joined[p]
                else:
                    labels[p][step] = len(reps[p])
                    reps[p].append(text)
                # Later copies of this text join its cluster with no check.
                seen[p][normalize_answer(text)] = labels[p][step]
        return labels


equivalence_registry: Registry[Equivalence] = Registry(
    "equivalence", Equivalence  # type: ignore[type-abstract]
)


def resolve_equivalence(obj: Any, param: str, owner: str) -> Equivalence:
    """An :class:`Equivalence` from an instance or a registered name.

    Raises
    ------
    InvalidParameterError
        Unknown name (the message lists the valid ones).
    InvalidTypeError
        Neither a string nor an Equivalence.
    """
    if isinstance(obj, str) and obj not in equivalence_registry.names():
        raise param_error(
            param, owner, "an Equivalence or one of "
            + ", ".join(repr(n) for n in equivalence_registry.names()), obj,
        )
    return equivalence_registry.resolve(obj, param, owner)


@equivalence_registry.register("exact")
class ExactMatchEquivalence(Equivalence):
    """Two answers are equivalent when their extracted answers are equal.

    Parameters
    ----------
    extractor : {"short", "number", "choice", "normalized"} or callable, default "short"
        See :mod:`confroute.estimators.answers`. An answer from which nothing can
        be extracted (None) is equivalent to no other answer, except one whose
        normalised text is identical.
    """

    def __init__(self, extractor: Any = "short") -> None:
        self.extractor = extractor

    def _equivalent_batch(
        self, questions: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> np.ndarray:
        fn = get_extractor(self.extractor, "extractor", type(self).__name__)
        out = np.zeros(len(first), dtype=bool)
        for i, (a, b) in enumerate(zip(first, second)):
            ea, eb = fn(a), fn(b)
            out[i] = ea is not None and ea == eb
        return out


@equivalence_registry.register("embedding")
class EmbeddingEquivalence(Equivalence):
    """Two answers are equivalent when their embeddings are close.

    .. math:: \\mathrm{equiv}(a, b) \\iff \\frac{e_a \\cdot e_b}{\\|e_a\\| \\|e_b\\|} \\ge \\theta

    Parameters
    ----------
    embedder : object with ``encode(texts) -> ndarray (n, d)``, optional
        Defaults to :func:`confroute.models.load_default_embedder` (all-MiniLM-L6-v2
        shipped in a PyPI package), loaded on first use.
    threshold : float in [-1, 1], default 0.85
        Minimum cosine similarity :math:`\\theta`.
    """

    def __init__(self, embedder: Any = None, threshold: float = 0.85) -> None:
        self.embedder = embedder
        self.threshold = threshold

    def _memo(self) -> dict[str, np.ndarray] | None:
        local = self.__dict__.get("_local")
        return None if local is None else getattr(local, "memo", None)

    def _prepare(self, texts: Sequence[str]) -> None:
        # One encode call for every text of the clustering (not one per step).
        import threading

        local = self.__dict__.setdefault("_local", threading.local())
        local.memo = self._embed(sorted(set(texts)))

    def _release(self) -> None:
        local = self.__dict__.get("_local")
        if local is not None:
            local.memo = None

    def _embed(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Unit-normalised embeddings of ``texts``."""
        if not texts:
            return {}
        emb = np.asarray(self._get_embedder().encode(texts), dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise EstimationError(
                f"The embedder returned an array of shape {emb.shape} for {len(texts)} texts; "
                "expected (n_texts, dim)."
            )
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        emb = emb / np.where(norms > 0, norms, 1.0)
        return dict(zip(texts, emb))

    def _get_embedder(self) -> Any:
        if self.embedder is None:
            from confroute.models.embedded import load_default_embedder

            self._default_embedder = getattr(self, "_default_embedder", None)
            if self._default_embedder is None:
                self._default_embedder = load_default_embedder()
            return self._default_embedder
        if not callable(getattr(self.embedder, "encode", None)):
            raise param_error(
                "embedder", type(self).__name__, "an object with an encode(texts) method",
                self.embedder, type_error=True,
            )
        return self.embedder

    def _equivalent_batch(
        self, questions: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> np.ndarray:
        thr = float(check_float(self.threshold, "threshold", type(self).__name__,
                                min_value=-1.0, max_value=1.0) or 0.0)
        known = self._memo() or {}
        vectors = {**known, **self._embed(sorted((set(first) | set(second)) - set(known)))}
        ea = np.stack([vectors[t] for t in first])
        eb = np.stack([vectors[t] for t in second])
        cos = np.sum(ea * eb, axis=1)
        return np.asarray(cos >= thr - 1e-9, dtype=bool)


@equivalence_registry.register("nli")
class NLIEquivalence(Equivalence):
    """Bidirectional entailment with a natural-language-inference classifier.

    Each answer is turned into a statement (``question + " " + answer`` when
    ``include_question``) and the NLI model is run in both directions,
    :math:`a \\Rightarrow b` and :math:`b \\Rightarrow a`, in one batch.

    - ``mode="strict"`` (Kuhn et al. [1]_): equivalent iff both directions are
      classified as entailment.
    - ``mode="non_contradiction"``: equivalent iff neither direction is classified
      as contradiction (more lenient; neutral pairs are merged).

    Parameters
    ----------
    model_path : str or path-like
        Local directory of any Hugging Face sequence-classification NLI model
        (e.g. a DeBERTa fine-tuned on MNLI). The entailment and contradiction
        label ids are read from ``config.id2label`` (case-insensitive prefixes
        ``entail`` and ``contradict``). Nothing is downloaded.
    mode : {"strict", "non_contradiction"}, default "strict"
    device : str, default "auto"
        "auto" picks CUDA, then MPS, then CPU.
    batch_size : int, default 32
        Premise/hypothesis pairs per forward pass.
    include_question : bool, default True
        Prefix each answer with the question, as in [1]_.
    """

    def __init__(
        self,
        model_path: Any = None,
        *,
        mode: str = "strict",
        device: str = "auto",
        batch_size: int = 32,
        include_question: bool = True,
    ) -> None:
        self.model_path = model_path
        self.mode = mode
        self.device = device
        self.batch_size = batch_size
        self.include_question = include_question

    def _load(self) -> tuple[Any, Any, int, int]:
        key = str(self.model_path)
        cached = getattr(self, "_loaded", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        owner = type(self).__name__
        if self.model_path is None:
            raise param_error(
                "model_path", owner, "the local directory of an NLI sequence-classification "
                "model (nothing is downloaded)", None,
            )
        folder = key
        if isinstance(self.model_path, (str, os.PathLike)) and ".." in Path(self.model_path).parts:
            # resolve "..": the result must be an existing local directory, named in errors
            folder = str(check_existing_dir(self.model_path, "model_path", owner))
        try:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as exc:  # pragma: no cover - transformers is a dependency
            from confroute.errors import MissingDependencyError

            raise MissingDependencyError("NLIEquivalence needs transformers and torch.") from exc
        try:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"Could not load an NLI model from {key!r}: {exc}") from exc
        id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
        ent = [i for i, lab in id2label.items() if lab.lower().startswith("entail")]
        con = [i for i, lab in id2label.items() if lab.lower().startswith("contradict")]
        if len(ent) != 1 or len(con) != 1:
            raise ModelLoadError(
                f"The NLI model at {key!r} must have exactly one 'entailment' and one "
                f"'contradiction' label in config.id2label; its labels are "
                f"{sorted(id2label.values())}."
            )
        from confroute.models.device import resolve_device

        model.to(resolve_device(self.device, owner))
        model.eval()
        loaded = (model, tok, ent[0], con[0])
        self._loaded = (key, loaded)
        return loaded

    def _predict(self, premises: list[str], hypotheses: list[str]) -> np.ndarray:
        import torch

        model, tok, _, _ = self._load()
        bs = check_int(self.batch_size, "batch_size", type(self).__name__, min_value=1)
        device = next(model.parameters()).device
        out: list[np.ndarray] = []
        with torch.no_grad():
            for start in range(0, len(premises), bs):
                enc = tok(
                    premises[start:start + bs], hypotheses[start:start + bs],
                    padding=True, truncation=True, return_tensors="pt",
                )
                enc = {k: v.to(device) for k, v in enc.items()}
                logits = model(**enc).logits
                out.append(logits.argmax(dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _equivalent_batch(
        self, questions: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> np.ndarray:
        owner = type(self).__name__
        mode = check_choice(self.mode, "mode", owner, ("strict", "non_contradiction"))
        if not isinstance(self.include_question, bool):
            raise param_error("include_question", owner, "a bool", self.include_question,
                              type_error=True)
        _, _, ent, con = self._load()
        if self.include_question:
            a = [f"{q} {t}" for q, t in zip(questions, first)]
            b = [f"{q} {t}" for q, t in zip(questions, second)]
        else:
            a, b = list(first), list(second)
        # Forward direction first; the reverse check runs only for the pairs it can
        # still change (strict: forward entails; non-contradiction: forward does not
        # contradict), which halves the NLI work when most pairs differ.
        forward = self._predict(a, b)
        alive = forward == ent if mode == "strict" else forward != con
        out = np.zeros(len(a), dtype=bool)
        idx = np.flatnonzero(alive)
        if idx.size:
            backward = self._predict([b[i] for i in idx], [a[i] for i in idx])
            out[idx] = backward == ent if mode == "strict" else backward != con
        return out
