"""The Router: estimator -> calibrator -> policy, with the edge and cloud models around it."""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from confroute._persist import import_parts, part_from_spec, part_to_spec
from confroute._serialization import DEFAULT_MAX_BYTES, read_file, write_file
from confroute._validation import (
    check_choice,
    check_int,
    check_labels,
    check_prompts,
    check_same_length,
    param_error,
)
from confroute._version import __version__
from confroute.errors import (
    CloudError,
    InvalidParameterError,
    NotFittedError,
    SerializationError,
)
from confroute.grading import GraderLike, resolve_grader
from confroute.models.base import LanguageModel, SampleRequest, collect_samples
from confroute.policies import OnlinePolicy, Ticket
from confroute.types import (
    Decision,
    GenerationConfig,
    Prompt,
    RoutedResponse,
    Samples,
    prompt_text,
)

__all__ = ["Router"]

logger = logging.getLogger(__name__)

EstimatorLike = str | Any | Sequence[Any]


def check_samples(
    samples: Any, prompts: Sequence[Prompt], owner: str
) -> Sequence[Samples] | None:
    """Check that ``samples`` is None or holds one :class:`Samples` per prompt, in order.

    Parameters
    ----------
    samples : sequence of Samples of length n, or None
    prompts : sequence of Prompt of length n
        The validated prompts (as returned by ``check_prompts``).
    owner : str
        The method named in the error.

    Returns
    -------
    sequence of Samples of length n, or None
        ``samples`` unchanged.

    Raises
    ------
    InvalidTypeError
        If ``samples`` is not a sequence or an element is not a Samples.
    InvalidParameterError
        If the lengths differ or an element answers another prompt.
    """
    if samples is None:
        return None
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
        raise param_error("samples", owner, "a sequence of Samples, one per prompt", samples,
                          type_error=True)
    check_same_length(owner, prompts=prompts, samples=samples)
    for i, (s, p) in enumerate(zip(samples, prompts)):
        if not isinstance(s, Samples):
            raise param_error("samples", owner,
                              f"a sequence of Samples, one per prompt (samples[{i}] is not)",
                              s, type_error=True)
        if not _same_prompt(s.prompt, p):
            raise param_error("samples", owner,
                              f"one Samples per prompt, in order (samples[{i}].prompt is not "
                              f"prompts[{i}])", s.prompt)
    return samples


def _same_prompt(given: Any, prompt: Prompt) -> bool:
    """True when ``given`` (a Samples' prompt) is ``prompt`` (a conversation: any sequence)."""
    if isinstance(given, str) or isinstance(prompt, str):
        return given == prompt
    if not isinstance(given, Sequence) or len(given) != len(prompt):
        return False
    return all(isinstance(g, Mapping) and dict(g) == dict(m) for g, m in zip(given, prompt))


class Router:
    """Route each prompt to the edge model or the cloud model.

    The router composes three parts:

    1. an :class:`~confroute.estimators.UncertaintyEstimator` (or a list of them)
       that scores how uncertain the edge model is (higher = more uncertain),
    2. a :class:`~confroute.calibration.Calibrator` that maps the score(s) to
       ``p_good``, the probability that the edge answer is good,
    3. a :class:`~confroute.policies.Policy` that decides, under a budget, which
       prompts escalate to the cloud.

    Parameters
    ----------
    estimator : str, UncertaintyEstimator or list of them, default "sequence_logprob"
        A name from the estimator registry or an object. With a list, every
        estimator runs on one shared generation and their scores become the
        features of a multi-feature calibrator (use ``calibrator="platt"``).
    calibrator : str or Calibrator, default "isotonic"
    policy : str or Policy, default "threshold"
    edge : LanguageModel, optional
        The local model whose answers are kept. Needed by ``calibrate``,
        ``decide`` / ``route`` and ``__call__`` unless samples are passed in.
    cloud : LanguageModel or sequence of LanguageModel, optional
        The model escalated prompts go to in ``answer`` / ``__call__`` (any object with the
        protocol: :class:`~confroute.models.OpenAIModel`, a second local
        :class:`~confroute.models.HFLanguageModel`, a recorded model, ...). A
        sequence ``[primary, fallback, ...]`` is a fallback chain: a prompt whose
        call to one cloud fails after that cloud's own retries goes to the next;
        the first that answers is named in ``RoutedResponse.answered_by`` and its
        cost is charged. Failed attempts are assumed not billed (a failed call
        returns no completion), so only the answering cloud is charged.
        ``router.cloud`` is the primary (assigning a model or a list replaces the
        chain) and ``router.clouds`` the whole chain.
    on_cloud_error : {"degrade", "raise", "error"}, default "degrade"
        What ``answer`` / ``__call__`` do when a cloud call fails after its retries:
        ``"degrade"`` serves the edge answer marked ``degraded=True`` with the
        reason; ``"error"`` returns a response with ``text=None`` and the error;
        ``"raise"`` raises :class:`~confroute.errors.CloudError` (after every
        other request of the batch was answered).
    cloud_config : GenerationConfig, optional
        How the cloud answers (default: greedy, 512 new tokens).
    edge_max_new_tokens : int, default 64
        Length of the edge answer when the estimator itself does not need one.

    Examples
    --------
    >>> router = Router("sequence_logprob", "isotonic", "threshold", edge=edge_model)
    >>> router.calibrate(prompts, references=answers, grader="contains")  # doctest: +SKIP
    >>> decisions = router.decide(["What is the capital of France?"])  # doctest: +SKIP
    >>> responses = router.answer(decisions)  # doctest: +SKIP
    """

    _clouds: tuple[LanguageModel, ...]

    def __init__(
        self,
        estimator: EstimatorLike = "sequence_logprob",
        calibrator: Any = "isotonic",
        policy: Any = "threshold",
        *,
        edge: LanguageModel | None = None,
        cloud: LanguageModel | Sequence[LanguageModel] | None = None,
        on_cloud_error: Literal["degrade", "raise", "error"] = "degrade",
        cloud_config: GenerationConfig | None = None,
        edge_max_new_tokens: int = 64,
    ) -> None:
        from confroute.calibration import calibrator_registry
        from confroute.estimators import estimator_registry
        from confroute.policies import policy_registry

        owner = "Router"
        if isinstance(estimator, Sequence) and not isinstance(estimator, str):
            if len(estimator) == 0:
                raise param_error("estimator", owner, "an estimator or a non-empty list", estimator)
            members = list(estimator)
        else:
            members = [estimator]
        if any(isinstance(e, str) and e not in estimator_registry.names() for e in members):
            import_parts("estimator")  # names registered by higher layers (query routers)
        self.estimators = [estimator_registry.resolve(e, "estimator", owner) for e in members]
        self.calibrator = calibrator_registry.resolve(calibrator, "calibrator", owner)
        self.policy = policy_registry.resolve(policy, "policy", owner)
        if edge is not None and not isinstance(edge, LanguageModel):
            raise param_error(
                "edge", owner, "a LanguageModel (an object with a 'name' and "
                "generate(prompts, config)) or None", edge, type_error=True,
            )
        self.edge = edge
        self.cloud = cloud  # the setter accepts a chain and checks each model
        self.on_cloud_error = check_choice(
            on_cloud_error, "on_cloud_error", owner, ["degrade", "raise", "error"]
        )
        if cloud_config is not None and not isinstance(cloud_config, GenerationConfig):
            raise param_error("cloud_config", owner, "a GenerationConfig or None", cloud_config,
                              type_error=True)
        self.cloud_config = cloud_config or GenerationConfig(max_new_tokens=512)
        self.edge_max_new_tokens = int(
            check_int(edge_max_new_tokens, "edge_max_new_tokens", owner, min_value=1) or 1
        )
        self.calibration_: dict[str, Any] | None = None

    # ------------------------------------------------------------------- clouds
    @property
    def cloud(self) -> LanguageModel | None:
        """The primary cloud model (the first of :attr:`clouds`), or None."""
        return self._clouds[0] if self._clouds else None

    @cloud.setter
    def cloud(self, value: LanguageModel | Sequence[LanguageModel] | None) -> None:
        self._clouds = _check_clouds(value, "Router")

    @property
    def clouds(self) -> tuple[LanguageModel, ...]:
        """The cloud fallback chain, in the order it is tried (empty without a cloud)."""
        return self._clouds

    # ------------------------------------------------------------------ helpers
    @property
    def feature_names(self) -> list[str]:
        """Names of the estimator scores fed to the calibrator."""
        names: list[str] = []
        for e in self.estimators:
            n, i = e.name, 2
            while n in names:
                n, i = f"{e.name}_{i}", i + 1
            names.append(n)
        return names

    def _estimate(
        self,
        prompts: list[Prompt],
        samples: Sequence[Samples] | None,
        *,
        need_greedy: bool,
    ) -> tuple[np.ndarray, list[Samples], float]:
        """Scores (n,) or (n, k) and the shared samples; also the edge seconds spent."""
        from confroute.estimators import estimate_many

        t0 = time.perf_counter()
        for est in self.estimators:  # e.g. a probe on another model: refused before decoding
            est.check_model(self.edge)
        requests = [r for e in self.estimators if e.needs_generation for r in e.sample_requests()]
        if need_greedy:
            requests.append(SampleRequest(greedy=True, max_new_tokens=self.edge_max_new_tokens))
        used = collect_samples(self.edge, prompts, requests, existing=samples)
        results = estimate_many(self.estimators, prompts, self.edge, samples=used)
        cols = [r.scores for r in results.values()]
        feats = cols[0] if len(cols) == 1 else np.column_stack(cols)
        return feats, used, time.perf_counter() - t0

    def check_calibrated(self) -> None:
        """Raise :class:`~confroute.errors.NotFittedError` (naming the fix) if not calibrated."""
        if self.calibration_ is None:
            raise NotFittedError(
                "This Router is not calibrated yet: call router.calibrate(prompts, labels) or "
                "router.calibrate(prompts, references=..., grader=...) first, or load a saved "
                "router with Router.load(path)."
            )

    def p_good_of(self, features: np.ndarray) -> np.ndarray:
        """Calibrated P(edge answer good) for estimator scores.

        Parameters
        ----------
        features : ndarray of shape (n,) or (n, n_estimators)
            Estimator scores, as the router's estimators produce them.

        Returns
        -------
        ndarray of shape (n,)
        """
        # The one call of the calibrator's probability method in the router.
        return np.asarray(self.calibrator.p_good(features), dtype=np.float64)

    # -------------------------------------------------------------- calibrate
    def calibrate(
        self,
        prompts: Sequence[Prompt],
        labels: Sequence[int] | np.ndarray | None = None,
        *,
        references: Sequence[Sequence[str] | str] | None = None,
        grader: GraderLike | Sequence[GraderLike] = "contains",
        samples: Sequence[Samples] | None = None,
        labeler: Any = None,
    ) -> Router:
        """Fit the calibrator and the policy on a held-out labelled set.

        Exactly one way of labelling the edge answers: ``labels`` (1 = the edge
        answer is good), ``references`` and a ``grader`` (the router generates
        the edge answers and grades them), or a ``labeler`` (the router
        generates the edge answers and asks the labeler). Every argument is
        checked before any model is called.

        Parameters
        ----------
        prompts : sequence of Prompt, length n
        labels : array-like of shape (n,), optional
            0/1 per prompt.
        references : sequence of length n, optional
            Accepted answers per prompt (a string or a list of strings).
        grader : str, callable or sequence of them, default "contains"
            How to grade an edge answer against its references (see
            :mod:`confroute.grading`); one per prompt for mixed sets.
        samples : sequence of Samples of length n, optional
            Generations made earlier, reused instead of generating again.
        labeler : str or object, optional
            An object with ``label(prompts, edge_samples) -> ndarray`` of shape
            (n,) holding 1 (edge answer good), 0 (bad) or NaN (unknown: left out
            of the fit and counted in ``calibration_["n_unlabeled"]``), and
            optionally ``describe() -> dict`` (recorded in
            ``calibration_["labeler"]``); or a name from
            ``confroute.labeling.labeler_registry``.

        Returns
        -------
        self
        """
        owner = "Router.calibrate"
        plist = check_prompts(prompts, owner)
        target = self._calibration_target(plist, labels, references, grader, samples, labeler)
        learned = [i for i, e in enumerate(self.estimators) if callable(getattr(e, "cross_fit",
                                                                                 None))]
        if not learned:
            feats, used, secs = self._estimate(plist, samples, need_greedy=target.needs_answer)
            y = target.label(plist, used)
        else:
            feats, used, secs, y = self._fit_learned(plist, samples, target, learned)
        self._fit_parts(plist, feats, y, secs, target.record)
        return self

    def _fit_learned(
        self, plist: list[Prompt], samples: Sequence[Samples] | None, target: _Target,
        learned: list[int],
    ) -> tuple[np.ndarray, list[Samples], float, np.ndarray]:
        """Fit the learned estimators (probes) on the calibration set, cross-fitted.

        Their columns of the returned scores are out-of-fold (each row scored by a
        probe fitted on the other folds), so the calibrator is never fitted on a
        score of a probe trained on the same row.
        """
        t0 = time.perf_counter()
        requests = [r for e in self.estimators if e.needs_generation for r in e.sample_requests()]
        if target.needs_answer:
            requests.append(SampleRequest(greedy=True, max_new_tokens=self.edge_max_new_tokens))
        used = collect_samples(self.edge, plist, requests, existing=samples)
        y = target.label(plist, used)
        oof: dict[int, np.ndarray] = {}
        for i in learned:
            oof[i], used = self.estimators[i].cross_fit(
                plist, used, y, self.edge)
        feats, used, secs = self._estimate(plist, used, need_greedy=target.needs_answer)
        feats = feats.copy()
        for i, col in oof.items():
            if feats.ndim == 1:
                feats = col
            else:
                feats[:, i] = col
        del secs  # the whole calibration pass, probe fitting included, is timed
        return feats, used, time.perf_counter() - t0, y

    def _calibration_target(
        self, plist: list[Prompt], labels: Any, references: Any, grader: Any,
        samples: Sequence[Samples] | None, labeler: Any,
    ) -> _Target:
        """Check every calibrate argument (no model call) and say how labels are made."""
        owner = "Router.calibrate"
        if sum(x is not None for x in (labels, references, labeler)) != 1:
            raise InvalidParameterError(
                "Router.calibrate needs exactly one of 'labels' (0/1 per prompt), "
                "'references' (accepted answers per prompt, graded with 'grader') or "
                "'labeler' (an object with label(prompts, edge_samples))."
            )
        check_samples(samples, plist, owner)
        if labels is not None:
            y = check_labels(labels, "labels", owner, require_both=False)
            check_same_length(owner, prompts=plist, labels=y)
            check_labels(y, "labels", owner)  # both classes, before any generation
            return _Target(lambda _p, _s: y.astype(np.float64), False, {})
        if references is not None:
            return _references_target(plist, references, grader, owner)
        return _labeler_target(_resolve_labeler(labeler, owner), len(plist), owner)

    def _fit_parts(
        self, plist: list[Prompt], feats: np.ndarray, y: np.ndarray, secs: float,
        record: dict[str, Any],
    ) -> None:
        """Fit calibrator and policy on the scored, labelled prompts; record the fit."""
        owner = "Router.calibrate"
        finite = ~np.isnan(feats).any(axis=1) if feats.ndim == 2 else ~np.isnan(feats)
        labelled = ~np.isnan(y)
        if finite.sum() < len(feats):
            logger.warning("%d of %d calibration prompts could not be scored and are left out "
                           "of the calibrator fit.", int((~finite).sum()), len(feats))
        if labelled.sum() < len(y):
            logger.warning("%d of %d calibration prompts have no label (the labeler returned "
                           "NaN) and are left out of the fit.", int((~labelled).sum()), len(y))
        use = finite & labelled
        y_use = check_labels(y[use], "labels", owner)  # both classes among usable ones
        self.calibrator.fit(feats[use], y_use)
        p = self.p_good_of(feats)
        y_lab = y[labelled].astype(np.int64)
        self.policy.fit(p[labelled], y_lab)
        self.calibration_ = {
            "n": len(plist),
            "n_unscored": int((~finite).sum()),
            "n_unlabeled": int((~labelled).sum()),
            "edge_accuracy": float(y_lab.mean()),
            "features": self.feature_names,
            "edge": getattr(self.edge, "name", None),
            "edge_seconds_per_prompt": secs / len(plist),
            **record,
        }

    def recalibrate(
        self,
        log: Any,
        *,
        labeler: Any = None,
        min_labels: int = 50,
        weight_recent: int | None = None,
        merge_calibration: tuple[Any, Any] | None = None,
        policy_window: int | None = None,
    ) -> Router:
        """A copy of this router with calibrator and policy refitted on a decision log.

        The labelled rows of ``log`` (a :class:`~confroute.traffic.DecisionLog`
        written by this router, e.g. by ``confroute serve --decision-log
        --shadow-rate``) are the new calibration set; estimators, models and
        parameters are shared, this router is unchanged. Same as
        :func:`confroute.traffic.recalibrate` (the weighting, merging and policy
        refit are described there).

        Parameters
        ----------
        log : DecisionLog
        labeler : Labeler, optional
            The labeler that made the log's labels (its ``describe()`` is recorded).
        min_labels : int >= 2, default 50
        weight_recent : int >= 1, optional
            Half-life of the recency weights, in labelled rows.
        merge_calibration : (scores, labels), optional
            The original calibration set: scores of shape (n,) or (n, k), labels (n,).
        policy_window : int >= 1, optional
            Logged rows the policy is refitted on (default: all).

        Returns
        -------
        Router
            A new calibrated router with a new fingerprint.

        Raises
        ------
        InvalidParameterError
            A log written by another router, too few labels, or a bad argument
            (checked before anything is fitted).
        """
        from confroute.recalibration import recalibrate_router

        new: Router = recalibrate_router(
            self, log, labeler=labeler, min_labels=min_labels, weight_recent=weight_recent,
            merge_calibration=merge_calibration, policy_window=policy_window,
            owner="Router.recalibrate")
        return new

    # ----------------------------------------------------------------- decide
    def predict_proba(
        self, prompts: Sequence[Prompt], *, samples: Sequence[Samples] | None = None
    ) -> np.ndarray:
        """P(edge answer good) for each prompt, shape (n,)."""
        self.check_calibrated()
        plist = check_prompts(prompts, "Router.predict_proba")
        check_samples(samples, plist, "Router.predict_proba")
        feats, _, _ = self._estimate(plist, samples, need_greedy=False)
        return self.p_good_of(feats)

    def decide(
        self, prompts: Sequence[Prompt], *, samples: Sequence[Samples] | None = None
    ) -> list[Decision]:
        """Decide edge or cloud for each prompt, without calling the cloud.

        Estimates, calibrates and applies the policy. With an enforced
        :class:`~confroute.policies.OnlinePolicy` each prompt is admitted to its
        ledger, in order, and its ticket travels in ``Decision.ticket`` until
        :meth:`answer` settles it (an escalation that is never answered stays
        counted as spent). With a pre-generation estimator the edge answer is
        generated only for the prompts kept on the edge.

        Parameters
        ----------
        prompts : sequence of Prompt, length n
        samples : sequence of Samples of length n, optional
            Generations made earlier, reused instead of generating again.

        Returns
        -------
        list of Decision
            One per prompt, in order, with ``p_good``, the raw scores, the edge
            answer (when one was generated), a short reason and the ticket.
        """
        plist = check_prompts(prompts, "Router.decide")
        return self._decide(plist, check_samples(samples, plist, "Router.decide"))

    def route(
        self, prompts: Sequence[Prompt], *, samples: Sequence[Samples] | None = None
    ) -> list[Decision]:
        """Decide edge or cloud for each prompt, without calling the cloud (as :meth:`decide`)."""
        plist = check_prompts(prompts, "Router.route")
        return self._decide(plist, check_samples(samples, plist, "Router.route"))

    def _decide(self, plist: list[Prompt], samples: Sequence[Samples] | None) -> list[Decision]:
        self.check_calibrated()
        any_post = any(e.needs_generation for e in self.estimators)
        feats, used, _ = self._estimate(plist, samples, need_greedy=any_post)
        p = self.p_good_of(feats)
        escalate, tickets = self._apply_policy(p)
        # Pre-generation estimators decide before any edge answer exists: generate
        # the edge answer only for the prompts that stay on the edge.
        keep = [i for i in range(len(plist)) if not escalate[i] and used[i].greedy is None]
        if keep:
            done = collect_samples(
                self.edge, [plist[i] for i in keep],
                [SampleRequest(greedy=True, max_new_tokens=self.edge_max_new_tokens)],
                existing=[used[i] for i in keep],
            )
            for i, s in zip(keep, done):
                used[i] = s
        names = self.feature_names
        decisions = []
        for i, prompt in enumerate(plist):
            row = feats[i] if feats.ndim == 2 else [feats[i]]
            greedy, tk, esc = used[i].greedy, tickets[i], bool(escalate[i])
            decisions.append(Decision(
                prompt=prompt, source="cloud" if esc else "edge", p_good=float(p[i]),
                scores={n: float(v) for n, v in zip(names, row)},
                edge_answer=None if greedy is None else greedy.text,
                reason=tk.reason if tk is not None else self.policy.explain(float(p[i]), esc),
                ticket=tk, edge_sample=greedy,
            ))
        return decisions

    def _apply_policy(self, p: np.ndarray) -> tuple[np.ndarray, list[Ticket | None]]:
        """Escalations (n,) and tickets: one admission per prompt when a budget is enforced."""
        policy = self.policy
        if isinstance(policy, OnlinePolicy) and policy.enforced:
            tickets: list[Ticket | None] = [policy.admit(float(v)) for v in p]
            return np.array([t is not None and t.escalate for t in tickets], dtype=bool), tickets
        return np.asarray(policy.decide(p), dtype=bool), [None] * len(p)

    # ----------------------------------------------------------------- answer
    def answer(
        self, decisions: Sequence[Decision], *, cloud_config: GenerationConfig | None = None
    ) -> list[RoutedResponse]:
        """Responses for decided prompts; never raises for a cloud failure.

        Edge answers are kept; the escalated prompts go to the cloud in one
        batched call (retried prompt by prompt if the batch fails, so one bad
        prompt never fails the others); every ticket is settled (a failed call
        gives its budget back). A failed call gives a degraded edge answer or an
        error record, per ``on_cloud_error``, with the error in
        ``response.cloud_error`` (``"raise"`` is applied by :meth:`__call__`).

        Parameters
        ----------
        decisions : sequence of Decision
            From :meth:`decide` (or any decision whose ticket, if any, comes from
            this router's policy).
        cloud_config : GenerationConfig, optional
            How the cloud answers (default: the router's ``cloud_config``).

        Returns
        -------
        list of RoutedResponse
            One per decision, in order.
        """
        owner = "Router.answer"
        ds = _check_decisions(decisions, owner)
        config = _check_config(cloud_config, owner) or self.cloud_config
        out: list[RoutedResponse | None] = [None] * len(ds)
        up = [i for i, d in enumerate(ds) if d.source == "cloud"]
        for i, d in enumerate(ds):
            if d.source == "edge":
                out[i] = RoutedResponse(text=d.edge_answer, source="edge", decision=d,
                                        answered_by=_model_name(self.edge),
                                        sample=d.edge_sample)
        if up:
            results = self._call_cloud([ds[i].prompt for i in up], config)
            for i, (res, model) in zip(up, results):
                out[i] = self._settle_and_respond(ds[i], res, model)
        return [r for r in out if r is not None]

    async def aanswer(
        self, decisions: Sequence[Decision], *, cloud_config: GenerationConfig | None = None
    ) -> list[RoutedResponse]:
        """Asynchronous :meth:`answer`: one concurrent cloud request per escalated prompt.

        Uses the cloud's ``agenerate`` when it has one and ``generate`` in a
        worker thread otherwise. Never raises for a cloud failure. If the
        awaiting task is cancelled during a cloud call, its ticket stays counted
        as spent (the call may have been billed).
        """
        import asyncio

        owner = "Router.aanswer"
        ds = _check_decisions(decisions, owner)
        config = _check_config(cloud_config, owner) or self.cloud_config

        async def one(d: Decision) -> RoutedResponse:
            if d.source == "edge":
                return RoutedResponse(text=d.edge_answer, source="edge", decision=d,
                                      answered_by=_model_name(self.edge), sample=d.edge_sample)
            return self._settle_and_respond(d, *await self._acloud_one(d.prompt, config))

        return list(await asyncio.gather(*(one(d) for d in ds)))

    def _settle_and_respond(self, d: Decision, res: Any, model: Any = None) -> RoutedResponse:
        """Settle the ticket of an escalated prompt and build its response.

        ``res`` is the samples of the cloud ``model`` that answered the prompt, or
        the CloudError the last cloud of the chain ended with; a failed call gives
        its ticket back (``spent=False``). The ledger is settled once, with the
        cost of the cloud that answered.
        """
        failed = isinstance(res, CloudError)
        cost_of = getattr(model, "cost_of", None)
        cost = None if failed or cost_of is None else float(cost_of(res))
        if d.ticket is not None and isinstance(self.policy, OnlinePolicy):
            # the ledger charges what was really spent (the reservation is corrected)
            self.policy.settle(d.ticket, spent=not failed, cost=cost)
        if isinstance(res, CloudError):
            return self._failed(d, res)
        usage = {
            "prompt_tokens": int(res[0].prompt_tokens or 0),
            "completion_tokens": int(sum(s.n_tokens for s in res)),
        }
        return RoutedResponse(text=res[0].text, source="cloud", decision=d,
                              cost=cost or 0.0, usage=usage, answered_by=_model_name(model),
                              sample=res[0])

    def _failed(self, d: Decision, err: CloudError) -> RoutedResponse:
        why = f"cloud call failed ({err.reason}): {err}"
        if self.on_cloud_error == "degrade" and d.edge_answer is not None:
            return RoutedResponse(text=d.edge_answer, source="edge", decision=d, degraded=True,
                                  error=why, cloud_error=err,
                                  answered_by=_model_name(self.edge), sample=d.edge_sample)
        return RoutedResponse(text=None, source="cloud", decision=d, error=why, cloud_error=err)

    def _call_cloud(self, prompts: list[Prompt], config: GenerationConfig) -> list[Any]:
        """(samples, cloud that answered) per prompt, or (CloudError, None).

        Each cloud of the chain gets the prompts every earlier cloud failed on.
        """
        if not self._clouds:
            err = CloudError("no cloud model is configured on this Router", reason="no_cloud")
            return [(err, None)] * len(prompts)
        out: list[Any] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        for k, cloud in enumerate(self._clouds):
            results = _generate_isolated(cloud, [prompts[i] for i in todo], config)
            for i, res in zip(todo, results):
                out[i] = (res, None if isinstance(res, CloudError) else cloud)
            todo = [i for i in todo if isinstance(out[i][0], CloudError)]
            if not todo:
                break
            if k + 1 < len(self._clouds):
                logger.warning("%d prompt(s) failed on cloud %r; trying fallback %r", len(todo),
                               _model_name(cloud), _model_name(self._clouds[k + 1]))
        return out

    async def _acloud_one(self, prompt: Prompt, config: GenerationConfig) -> tuple[Any, Any]:
        """(samples, cloud that answered) for one prompt, or (CloudError, None)."""
        res: Any = CloudError("no cloud model is configured on this Router", reason="no_cloud")
        for k, cloud in enumerate(self._clouds):
            res = await _agenerate_one(cloud, prompt, config)
            if not isinstance(res, CloudError):
                return res, cloud
            if k + 1 < len(self._clouds):
                logger.warning("cloud %r failed (%s); trying fallback %r", _model_name(cloud),
                               res.reason, _model_name(self._clouds[k + 1]))
        return res, None

    def _raise_first_failure(self, responses: list[RoutedResponse]) -> None:
        if self.on_cloud_error == "raise":
            for r in responses:
                if r.cloud_error is not None:
                    raise r.cloud_error

    # ------------------------------------------------------------------- call
    def __call__(
        self, prompts: Sequence[Prompt], *, samples: Sequence[Samples] | None = None
    ) -> list[RoutedResponse]:
        """Decide and answer (:meth:`decide` then :meth:`answer`).

        Every prompt gets a response: an answer, a degraded edge answer (cloud
        failed, ``on_cloud_error="degrade"``) or an explicit error record. With
        ``on_cloud_error="raise"`` the first failed call's
        :class:`~confroute.errors.CloudError` is raised after the whole batch
        was answered.
        """
        plist = check_prompts(prompts, "Router.__call__")
        responses = self.answer(self._decide(plist, samples))
        self._raise_first_failure(responses)
        return responses

    async def aroute(
        self, prompts: Sequence[Prompt], *, samples: Sequence[Samples] | None = None
    ) -> list[Decision]:
        """Asynchronous :meth:`decide`.

        The blocking edge work (generation, scoring, calibration, policy) runs in
        a worker thread (``asyncio.to_thread``), so the event loop stays
        responsive. Concurrent calls are not serialised here: an edge model that
        is not thread-safe needs one caller at a time (``confroute.serve`` runs
        all edge work on a single thread).

        Returns
        -------
        list of Decision
            One per prompt, in order, exactly as :meth:`decide` returns them.
        """
        import asyncio

        plist = check_prompts(prompts, "Router.aroute")
        return await asyncio.to_thread(self._decide, plist, samples)

    async def acall(
        self, prompts: Sequence[Prompt], *, samples: Sequence[Samples] | None = None
    ) -> list[RoutedResponse]:
        """Asynchronous :meth:`__call__`: :meth:`aroute` then :meth:`aanswer`.

        Edge work runs in a worker thread; escalated prompts go to the cloud
        concurrently. ``on_cloud_error`` applies as in :meth:`__call__`.
        """
        import asyncio

        plist = check_prompts(prompts, "Router.acall")
        decisions = await asyncio.to_thread(self._decide, plist, samples)
        responses = await self.aanswer(decisions)
        self._raise_first_failure(responses)
        return responses

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """The calibrated router as plain data (what :meth:`save` writes).

        Parts are stored as registered names, parameters and learned state
        (numpy arrays where a part has them); models and API keys are not.
        Rebuild with :meth:`from_dict`.
        """
        self.check_calibrated()
        return {
            "confroute_version": __version__,
            "estimators": [part_to_spec(e, "estimator") for e in self.estimators],
            "calibrator": part_to_spec(self.calibrator, "calibrator"),
            "policy": part_to_spec(self.policy, "policy"),
            "on_cloud_error": self.on_cloud_error,
            "edge_max_new_tokens": self.edge_max_new_tokens,
            "cloud_config": {
                "max_new_tokens": self.cloud_config.max_new_tokens,
                "temperature": self.cloud_config.temperature,
                "top_p": self.cloud_config.top_p,
                "top_k": self.cloud_config.top_k,
            },
            "calibration": dict(self.calibration_ or {}),
        }

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        *,
        edge: LanguageModel | None = None,
        cloud: LanguageModel | Sequence[LanguageModel] | None = None,
    ) -> Router:
        """Rebuild a router from :meth:`to_dict`'s output; only registered classes are built.

        Raises
        ------
        SerializationError
            If ``data`` is incomplete or names an unregistered part.
        """
        if not isinstance(data, dict):
            raise SerializationError(
                f"Saved router data must be a dict. Got {type(data).__name__}."
            )
        try:
            estimators = [part_from_spec(s, "estimator") for s in data["estimators"]]
            cc = data.get("cloud_config") or {}
            router = cls(
                estimators,
                part_from_spec(data["calibrator"], "calibrator"),
                part_from_spec(data["policy"], "policy"),
                edge=edge,
                cloud=cloud,
                on_cloud_error=data.get("on_cloud_error", "degrade"),
                cloud_config=GenerationConfig(**cc) if cc else None,
                edge_max_new_tokens=int(data.get("edge_max_new_tokens", 64)),
            )
        except SerializationError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(f"Saved router data is incomplete: {exc}") from None
        cal = data.get("calibration")
        if not isinstance(cal, dict):
            raise SerializationError("Saved router data has no calibration record.")
        router.calibration_ = dict(cal)
        return router

    def save(self, path: str | os.PathLike[str], *,
             signing_key: str | bytes | None = None) -> None:
        """Save the calibrated router (parts, parameters, learned state) as JSON.

        Models are not saved: pass ``edge`` and ``cloud`` again to :meth:`load`.
        API keys are never written. The file is replaced atomically.

        Parameters
        ----------
        path : str or path-like
        signing_key : str or bytes, optional
            Adds an HMAC-SHA256 of the contents (default: ``$CONFROUTE_SIGNING_KEY``
            when set), so that :meth:`load` with the key refuses altered files.
        """
        write_file(path, "router", self.to_dict(), signing_key=signing_key)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        edge: LanguageModel | None = None,
        cloud: LanguageModel | Sequence[LanguageModel] | None = None,
        signing_key: str | bytes | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> Router:
        """Load a router saved by :meth:`save`; never executes code from the file.

        Parameters
        ----------
        path : str or path-like
        edge, cloud : LanguageModel, optional
        signing_key : str or bytes, optional
            With a key (or ``$CONFROUTE_SIGNING_KEY``), unsigned or altered files are refused.
        max_bytes : int, default 64 MiB
            Largest file accepted (checked before reading it).
        """
        data = read_file(path, "router", signing_key=signing_key, max_bytes=max_bytes)
        try:
            return cls.from_dict(data, edge=edge, cloud=cloud)
        except SerializationError as exc:
            raise SerializationError(f"Saved router at {str(path)!r}: {exc}") from None

    def __repr__(self) -> str:
        est = self.estimators[0] if len(self.estimators) == 1 else self.estimators
        state = "calibrated" if self.calibration_ is not None else "not calibrated"
        return (f"Router(estimator={est!r}, calibrator={self.calibrator!r}, "
                f"policy={self.policy!r}, edge={getattr(self.edge, 'name', None)!r}, "
                f"cloud={getattr(self.cloud, 'name', None)!r}; {state})")


# ---------------------------------------------------------------- calibrate helpers
@dataclass(frozen=True)
class _Target:
    """How calibration labels are obtained once the edge answers exist."""

    label: Callable[[list[Prompt], list[Samples]], np.ndarray]
    """(prompts, edge samples) -> float labels of shape (n,): 1, 0 or NaN (unknown)."""
    needs_answer: bool
    """True if the edge answer (greedy) must be generated."""
    record: dict[str, Any]
    """Extra entries for ``calibration_``."""


def _references_target(plist: list[Prompt], references: Any, grader: Any, owner: str) -> _Target:
    if isinstance(references, (str, bytes)) or not isinstance(references, Sequence):
        raise param_error("references", owner, "a sequence with accepted answers per prompt",
                          references, type_error=True)
    check_same_length(owner, prompts=plist, references=references)
    refs: list[list[str]] = []
    for r in references:
        rl = [r] if isinstance(r, str) else list(r) if isinstance(r, Sequence) else None
        if rl is None or not all(isinstance(x, str) for x in rl):
            raise param_error("references", owner, "a string or a list of strings per prompt",
                              r, type_error=True)
        refs.append(rl)
    if isinstance(grader, str) or callable(grader):
        graders = [resolve_grader(grader, owner)] * len(plist)
    else:
        glist = list(grader)
        check_same_length(owner, prompts=plist, grader=glist)
        graders = [resolve_grader(g, owner) for g in glist]

    def label(_p: list[Prompt], used: list[Samples]) -> np.ndarray:
        return np.array([float(g(_edge_text(s), r) >= 0.5)
                         for g, s, r in zip(graders, used, refs)], dtype=np.float64)

    return _Target(label, True, {})


def _resolve_labeler(labeler: Any, owner: str) -> Any:
    if isinstance(labeler, str):
        try:
            module = importlib.import_module("confroute.labeling")
        except ModuleNotFoundError:
            raise InvalidParameterError(
                f"The 'labeler' parameter of {owner} names {labeler!r}, but named labelers need "
                "confroute.labeling, which is not available; pass a labeler object instead."
            ) from None
        try:
            return module.labeler_registry.resolve(labeler, "labeler", owner)
        except TypeError as exc:  # a labeler whose constructor needs arguments
            raise param_error("labeler", owner, "a labeler object (this named labeler needs "
                              f"constructor arguments: {exc})", labeler) from None
    if not callable(getattr(labeler, "label", None)):
        raise param_error("labeler", owner, "a labeler name or an object with "
                          "label(prompts, edge_samples)", labeler, type_error=True)
    return labeler


def _labeler_target(labeler: Any, n: int, owner: str) -> _Target:
    describe = getattr(labeler, "describe", None)
    record: dict[str, Any] = {"labeler": dict(describe()) if callable(describe) else
                              {"name": type(labeler).__name__}}

    def label(plist: list[Prompt], used: list[Samples]) -> np.ndarray:
        try:
            y = np.asarray(labeler.label(plist, used), dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise param_error("labeler", owner, "an object whose label() returns numbers",
                              exc) from None
        ok = y.shape == (n,) and bool(np.all(np.isnan(y) | (y == 0.0) | (y == 1.0)))
        if not ok:
            raise param_error("labeler", owner, f"an object whose label() returns shape ({n},) "
                              "with 1 (good), 0 (bad) or NaN (unknown)", y)
        return y

    return _Target(label, True, record)


def _check_decisions(decisions: Any, owner: str) -> list[Decision]:
    if isinstance(decisions, Decision) or not isinstance(decisions, Sequence) or not all(
        isinstance(d, Decision) for d in decisions
    ):
        raise param_error("decisions", owner, "a sequence of Decision (from Router.decide)",
                          decisions, type_error=True)
    return list(decisions)


def _check_config(config: Any, owner: str) -> GenerationConfig | None:
    if config is not None and not isinstance(config, GenerationConfig):
        raise param_error("cloud_config", owner, "a GenerationConfig or None", config,
                          type_error=True)
    return config


def _edge_text(s: Samples) -> str:
    if s.greedy is None:
        raise InvalidParameterError(
            f"No edge answer was generated for prompt {prompt_text(s.prompt)[:60]!r}."
        )
    return s.greedy.text


def _check_clouds(value: Any, owner: str) -> tuple[LanguageModel, ...]:
    """The cloud chain as a tuple: None -> (), a model -> (model,), a sequence -> its models."""
    if value is None:
        return ()
    chain = list(value) if isinstance(value, (list, tuple)) else [value]
    for k, model in enumerate(chain):
        if not isinstance(model, LanguageModel):
            name = "cloud" if chain == [value] else f"cloud[{k}]"
            raise param_error(name, owner, "a LanguageModel (an object with a 'name' and "
                              "generate(prompts, config)), a list of them, or None", model,
                              type_error=True)
    return tuple(chain)


def _model_name(model: Any) -> str | None:
    if model is None:
        return None
    name = getattr(model, "name", None)
    return name if isinstance(name, str) else type(model).__name__


def _generate_isolated(cloud: Any, prompts: list[Prompt], config: GenerationConfig) -> list[Any]:
    """Samples per prompt from one cloud, or the CloudError that prompt ended with.

    A failed batch is retried prompt by prompt, so one bad prompt never fails the others.
    """
    try:
        return list(cloud.generate(prompts, config))
    except Exception as exc:  # isolate the failing prompts, keep the others
        if len(prompts) == 1:
            return [_as_cloud_error(exc)]
        logger.warning("batched cloud call failed (%s); retrying prompt by prompt", exc)

    def one(p: Prompt) -> Any:
        try:
            return cloud.generate([p], config)[0]
        except Exception as exc:
            return _as_cloud_error(exc)

    with ThreadPoolExecutor(max_workers=min(8, len(prompts))) as pool:
        return list(pool.map(one, prompts))


async def _agenerate_one(cloud: Any, prompt: Prompt, config: GenerationConfig) -> Any:
    """Samples for one prompt from one cloud, or the CloudError the call ended with."""
    import asyncio

    agenerate = getattr(cloud, "agenerate", None)
    try:
        if agenerate is not None:
            out = await agenerate([prompt], config)
        else:
            out = await asyncio.to_thread(cloud.generate, [prompt], config)
        if not out or not out[0]:
            raise CloudError("the cloud model returned no sample", reason="malformed_response")
        return list(out[0])
    except Exception as exc:
        return _as_cloud_error(exc)


def _as_cloud_error(exc: Exception) -> CloudError:
    if isinstance(exc, CloudError):
        return exc
    return CloudError(f"{type(exc).__name__}: {exc}", reason="exception")


