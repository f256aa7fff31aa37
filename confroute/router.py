"""The Router: estimator -> calibrator -> policy, with the edge and cloud models around it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

from confroute import __version__
from confroute._persist import part_from_spec, part_to_spec
from confroute._serialization import read_file, write_file
from confroute._validation import check_choice, check_prompts, check_same_length, param_error
from confroute.errors import (
    CloudError,
    InvalidParameterError,
    NotFittedError,
    SerializationError,
)
from confroute.grading import GraderLike, resolve_grader
from confroute.models.base import LanguageModel, SampleRequest, collect_samples
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
        The local model whose answers are kept. Needed by ``calibrate``, ``route``
        and ``__call__`` unless samples are passed in.
    cloud : LanguageModel, optional
        The model escalated prompts go to in ``__call__`` (any object with the
        protocol: :class:`~confroute.models.OpenAIModel`, a second local
        :class:`~confroute.models.HFLanguageModel`, a recorded model, ...).
    on_cloud_error : {"degrade", "raise", "error"}, default "degrade"
        What ``__call__`` does when a cloud call fails after its retries:
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
    >>> decisions = router.route(["What is the capital of France?"])  # doctest: +SKIP
    """

    def __init__(
        self,
        estimator: EstimatorLike = "sequence_logprob",
        calibrator: Any = "isotonic",
        policy: Any = "threshold",
        *,
        edge: LanguageModel | None = None,
        cloud: LanguageModel | None = None,
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
            self.estimators = [
                estimator_registry.resolve(e, "estimator", owner) for e in estimator
            ]
        else:
            self.estimators = [estimator_registry.resolve(estimator, "estimator", owner)]
        self.calibrator = calibrator_registry.resolve(calibrator, "calibrator", owner)
        self.policy = policy_registry.resolve(policy, "policy", owner)
        self.edge = edge
        self.cloud = cloud
        self.on_cloud_error = check_choice(
            on_cloud_error, "on_cloud_error", owner, ["degrade", "raise", "error"]
        )
        if cloud_config is not None and not isinstance(cloud_config, GenerationConfig):
            raise param_error("cloud_config", owner, "a GenerationConfig or None", cloud_config,
                              type_error=True)
        self.cloud_config = cloud_config or GenerationConfig(max_new_tokens=512)
        from confroute._validation import check_int

        self.edge_max_new_tokens = int(
            check_int(edge_max_new_tokens, "edge_max_new_tokens", owner, min_value=1) or 1
        )
        self.calibration_: dict[str, Any] | None = None

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
        requests = [r for e in self.estimators if e.needs_generation for r in e.sample_requests()]
        if need_greedy:
            requests.append(SampleRequest(greedy=True, max_new_tokens=self.edge_max_new_tokens))
        used = collect_samples(self.edge, prompts, requests, existing=samples)
        results = estimate_many(self.estimators, prompts, self.edge, samples=used)
        cols = [r.scores for r in results.values()]
        feats = cols[0] if len(cols) == 1 else np.column_stack(cols)
        return feats, used, time.perf_counter() - t0

    def _check_fitted(self) -> None:
        if self.calibration_ is None:
            raise NotFittedError(
                "This Router is not calibrated yet: call router.calibrate(prompts, labels) or "
                "router.calibrate(prompts, references=..., grader=...) first, or load a saved "
                "router with Router.load(path)."
            )

    # -------------------------------------------------------------- calibrate
    def calibrate(
        self,
        prompts: Sequence[Prompt],
        labels: Sequence[int] | np.ndarray | None = None,
        *,
        references: Sequence[Sequence[str] | str] | None = None,
        grader: GraderLike | Sequence[GraderLike] = "contains",
        samples: Sequence[Samples] | None = None,
    ) -> Router:
        """Fit the calibrator and the policy on a held-out labelled set.

        Either give ``labels`` (1 = the edge answer is good) for the edge
        answers, or ``references`` and a ``grader``: the router then generates the
        edge answers, grades them and fits on the result.

        Parameters
        ----------
        prompts : sequence of Prompt, length n
        labels : array-like of shape (n,), optional
        references : sequence of length n, optional
            Accepted answers per prompt (a string or a list of strings).
        grader : str, callable or sequence of them, default "contains"
            How to grade an edge answer against its references (see
            :mod:`confroute.grading`); one per prompt for mixed sets.
        samples : sequence of Samples, optional
            Generations made earlier, reused instead of generating again.

        Returns
        -------
        self
        """
        owner = "Router.calibrate"
        plist = check_prompts(prompts, owner)
        if (labels is None) == (references is None):
            raise InvalidParameterError(
                "Router.calibrate needs exactly one of 'labels' (0/1 per prompt) or "
                "'references' (accepted answers per prompt, graded with 'grader')."
            )
        feats, used, secs = self._estimate(plist, samples, need_greedy=references is not None)
        if references is not None:
            check_same_length(owner, prompts=plist, references=references)
            if isinstance(grader, (str,)) or callable(grader):
                graders = [resolve_grader(grader, owner)] * len(plist)
            else:
                glist = list(grader)
                check_same_length(owner, prompts=plist, grader=glist)
                graders = [resolve_grader(g, owner) for g in glist]
            y = np.array(
                [
                    int(g(_edge_text(s), [r] if isinstance(r, str) else list(r)) >= 0.5)
                    for g, s, r in zip(graders, used, references)
                ],
                dtype=np.int64,
            )
        else:
            from confroute._validation import check_labels

            y = check_labels(labels, "labels", owner, require_both=False)
            check_same_length(owner, prompts=plist, labels=y)
        finite = ~np.isnan(feats).any(axis=1) if feats.ndim == 2 else ~np.isnan(feats)
        if finite.sum() < len(feats):
            logger.warning("%d of %d calibration prompts could not be scored and are left out "
                           "of the calibrator fit.", int((~finite).sum()), len(feats))
        from confroute._validation import check_labels

        check_labels(y[finite], "labels", owner)  # both classes needed among scorable ones
        self.calibrator.fit(feats[finite], y[finite])
        p = self.calibrator.p_good(feats)
        self.policy.fit(p, y)
        self.calibration_ = {
            "n": len(plist),
            "n_unscored": int((~finite).sum()),
            "edge_accuracy": float(y.mean()),
            "features": self.feature_names,
            "edge": getattr(self.edge, "name", None),
            "edge_seconds_per_prompt": secs / len(plist),
        }
        self._calibration_labels = y
        self._calibration_samples = used
        return self

    # ------------------------------------------------------------------ route
    def predict_proba(
        self, prompts: Sequence[Prompt], *, samples: Sequence[Samples] | None = None
    ) -> np.ndarray:
        """P(edge answer good) for each prompt, shape (n,)."""
        self._check_fitted()
        plist = check_prompts(prompts, "Router.predict_proba")
        feats, _, _ = self._estimate(plist, samples, need_greedy=False)
        return np.asarray(self.calibrator.p_good(feats), dtype=np.float64)

    def route(
        self, prompts: Sequence[Prompt], *, samples: Sequence[Samples] | None = None
    ) -> list[Decision]:
        """Decide edge or cloud for each prompt, without calling the cloud.

        Returns
        -------
        list of Decision
            One per prompt, in order, with ``p_good``, the raw scores, the edge
            answer (when one was generated) and a short reason.
        """
        decisions, _ = self._route(check_prompts(prompts, "Router.route"), samples)
        return decisions

    def _route(
        self, plist: list[Prompt], samples: Sequence[Samples] | None
    ) -> tuple[list[Decision], list[Any]]:
        self._check_fitted()
        any_post = any(e.needs_generation for e in self.estimators)
        feats, used, _ = self._estimate(plist, samples, need_greedy=any_post)
        p = np.asarray(self.calibrator.p_good(feats), dtype=np.float64)
        tickets: list[Any] = [None] * len(plist)
        admit: Callable[[float], Any] | None = getattr(self.policy, "admit", None)
        if admit is not None:  # online policies count every request in their ledger
            escalate = np.zeros(len(plist), dtype=bool)
            for i, pi in enumerate(p):
                tickets[i] = admit(float(pi))
                escalate[i] = bool(getattr(tickets[i], "escalate", tickets[i]))
        else:
            escalate = np.asarray(self.policy.decide(p), dtype=bool)
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
            greedy = used[i].greedy
            decisions.append(
                Decision(
                    prompt=prompt,
                    source="cloud" if escalate[i] else "edge",
                    p_good=float(p[i]),
                    scores={n: float(v) for n, v in zip(names, row)},
                    edge_answer=None if greedy is None else greedy.text,
                    reason=self._explain(float(p[i]), bool(escalate[i]), tickets[i]),
                )
            )
        return decisions, tickets

    def _explain(self, p: float, escalate: bool, ticket: Any) -> str:
        reason = getattr(ticket, "reason", None)
        if isinstance(reason, str) and reason:
            return reason
        explain = getattr(self.policy, "explain", None)
        if explain is not None:
            return str(explain(p, escalate))
        return "escalated" if escalate else "kept on edge"

    # ------------------------------------------------------------------- call
    def __call__(
        self, prompts: Sequence[Prompt], *, samples: Sequence[Samples] | None = None
    ) -> list[RoutedResponse]:
        """Route and answer: edge answers are kept, escalated prompts go to the cloud.

        Every prompt gets a response: an answer, a degraded edge answer (cloud
        failed, ``on_cloud_error="degrade"``) or an explicit error record.
        """
        plist = check_prompts(prompts, "Router.__call__")
        decisions, tickets = self._route(plist, samples)
        responses, failures = self._answer(plist, decisions, tickets)
        if failures and self.on_cloud_error == "raise":
            raise failures[0]
        return responses

    def _answer(
        self, plist: list[Prompt], decisions: list[Decision], tickets: list[Any]
    ) -> tuple[list[RoutedResponse], list[CloudError]]:
        """Responses for decided prompts: edge answers kept, one batched cloud call for
        the escalated ones (failures isolated per prompt), tickets settled."""
        out: list[RoutedResponse | None] = [None] * len(plist)
        up = [i for i, d in enumerate(decisions) if d.source == "cloud"]
        for i, d in enumerate(decisions):
            if d.source == "edge":
                out[i] = RoutedResponse(text=d.edge_answer, source="edge", decision=d)
        failures: list[CloudError] = []
        if up:
            results = self._call_cloud([plist[i] for i in up])
            for i, res in zip(up, results):
                out[i], err = self._settle_and_respond(decisions[i], tickets[i], res)
                if err is not None:
                    failures.append(err)
        responses = [r for r in out if r is not None]
        assert len(responses) == len(plist)
        return responses, failures

    def _settle_and_respond(
        self, d: Decision, ticket: Any, res: Any
    ) -> tuple[RoutedResponse, CloudError | None]:
        """Settle the budget ticket of an escalated prompt and build its response.

        ``res`` is the cloud's samples for the prompt or the CloudError its call
        ended with; a failed call gives its ticket back (``spent=False``).
        """
        settle = getattr(self.policy, "settle", None)
        failed = isinstance(res, CloudError)
        if settle is not None and ticket is not None:
            settle(ticket, spent=not failed)
        if failed:
            return self._failed(d, res), res
        cost_of = getattr(self.cloud, "cost_of", None)
        cost = float(cost_of(res)) if cost_of is not None else 0.0
        usage = {
            "prompt_tokens": int(res[0].prompt_tokens or 0),
            "completion_tokens": int(sum(s.n_tokens for s in res)),
        }
        response = RoutedResponse(text=res[0].text, source="cloud", decision=d, cost=cost,
                                  usage=usage)
        return response, None

    def _failed(self, d: Decision, err: CloudError) -> RoutedResponse:
        why = f"cloud call failed ({err.reason}): {err}"
        if self.on_cloud_error == "degrade" and d.edge_answer is not None:
            return RoutedResponse(text=d.edge_answer, source="edge", decision=d, degraded=True,
                                  error=why)
        return RoutedResponse(text=None, source="cloud", decision=d, error=why)

    def _call_cloud(self, prompts: list[Prompt]) -> list[Any]:
        """Cloud samples per prompt, or the CloudError that prompt ended with."""
        if self.cloud is None:
            err = CloudError("no cloud model is configured on this Router", reason="no_cloud")
            return [err] * len(prompts)
        cloud = self.cloud
        try:
            return list(cloud.generate(prompts, self.cloud_config))
        except Exception as exc:  # isolate the failing prompts, keep the others
            if len(prompts) == 1:
                return [_as_cloud_error(exc)]
            logger.warning("batched cloud call failed (%s); retrying prompt by prompt", exc)

        def one(p: Prompt) -> Any:
            try:
                return cloud.generate([p], self.cloud_config)[0]
            except Exception as exc:
                return _as_cloud_error(exc)

        with ThreadPoolExecutor(max_workers=min(8, len(prompts))) as pool:
            return list(pool.map(one, prompts))

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Save the calibrated router (parts, parameters, learned state) as JSON.

        Models are not saved: pass ``edge`` and ``cloud`` again to :meth:`load`.
        API keys are never written.
        """
        self._check_fitted()
        payload = {
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
            "calibration": self.calibration_,
        }
        write_file(path, "router", payload)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        edge: LanguageModel | None = None,
        cloud: LanguageModel | None = None,
    ) -> Router:
        """Load a router saved by :meth:`save`; never executes code from the file."""
        data = read_file(path, "router")
        try:
            estimators = [part_from_spec(s, "estimator") for s in data["estimators"]]
            calibrator = part_from_spec(data["calibrator"], "calibrator")
            policy = part_from_spec(data["policy"], "policy")
            cc = data.get("cloud_config") or {}
            router = cls(
                estimators,
                calibrator,
                policy,
                edge=edge,
                cloud=cloud,
                on_cloud_error=data.get("on_cloud_error", "degrade"),
                cloud_config=GenerationConfig(**cc) if cc else None,
                edge_max_new_tokens=int(data.get("edge_max_new_tokens", 64)),
            )
        except SerializationError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(
                f"Saved router at {str(path)!r} is incomplete: {exc}"
            ) from None
        cal = data.get("calibration")
        if not isinstance(cal, dict):
            raise SerializationError(f"Saved router at {str(path)!r} has no calibration record.")
        router.calibration_ = cal
        return router

    def __repr__(self) -> str:
        est = self.estimators[0] if len(self.estimators) == 1 else self.estimators
        state = "calibrated" if self.calibration_ is not None else "not calibrated"
        return (f"Router(estimator={est!r}, calibrator={self.calibrator!r}, "
                f"policy={self.policy!r}, edge={getattr(self.edge, 'name', None)!r}, "
                f"cloud={getattr(self.cloud, 'name', None)!r}; {state})")

    # ------------------------------------------------------------------- async
    async def aroute(
        self, prompts: Sequence[Prompt], *, samples: Sequence[Samples] | None = None
    ) -> list[Decision]:
        """Asynchronous :meth:`route`.

        The blocking edge work (generation, scoring, calibration, policy) runs in
        a worker thread (``asyncio.to_thread``), so the event loop stays
        responsive. Concurrent calls are not serialised here: an edge model that
        is not thread-safe needs one caller at a time (``confroute.serve`` runs
        all edge work on a single thread).

        Returns
        -------
        list of Decision
            One per prompt, in order, exactly as :meth:`route` returns them.
        """
        import asyncio

        plist = check_prompts(prompts, "Router.aroute")
        decisions, _ = await asyncio.to_thread(self._route, plist, samples)
        return decisions

    async def acall(
        self, prompts: Sequence[Prompt], *, samples: Sequence[Samples] | None = None
    ) -> list[RoutedResponse]:
        """Asynchronous :meth:`__call__`: route, keep edge answers, escalate the rest.

        Edge work runs in a worker thread as in :meth:`aroute`; escalated prompts
        go to the cloud concurrently, one request each, through the cloud's
        ``agenerate`` when it has one and ``generate`` in a worker thread
        otherwise. Every prompt gets a response (an answer, a degraded edge
        answer or an error record, per ``on_cloud_error``); a failed cloud call
        gives its budget ticket back (``settle(ticket, spent=False)``). With
        ``on_cloud_error="raise"`` the first :class:`~confroute.errors.CloudError`
        is raised once every cloud call of the batch has finished.
        """
        import asyncio

        plist = check_prompts(prompts, "Router.acall")
        decisions, tickets = await asyncio.to_thread(self._route, plist, samples)
        done = await asyncio.gather(*(self._aanswer(d, t) for d, t in zip(decisions, tickets)))
        failures = [err for _, err in done if err is not None]
        if failures and self.on_cloud_error == "raise":
            raise failures[0]
        return [resp for resp, _ in done]

    async def _aanswer(
        self, d: Decision, ticket: Any, config: GenerationConfig | None = None
    ) -> tuple[RoutedResponse, CloudError | None]:
        """The response for one decided prompt (cloud call if escalated) and its cloud error.

        Never raises for a cloud failure. If the awaiting task is cancelled during
        the cloud call, the ticket stays counted as spent (the call may have been
        billed).
        """
        if d.source == "edge":
            return RoutedResponse(text=d.edge_answer, source="edge", decision=d), None
        res = await self._acloud_one(d.prompt, config or self.cloud_config)
        return self._settle_and_respond(d, ticket, res)

    async def _acloud_one(self, prompt: Prompt, config: GenerationConfig) -> Any:
        """Cloud samples for one prompt, or the CloudError the call ended with."""
        import asyncio

        cloud = self.cloud
        if cloud is None:
            return CloudError("no cloud model is configured on this Router", reason="no_cloud")
        agenerate = getattr(cloud, "agenerate", None)
        try:
            if agenerate is not None:
                out = await agenerate([prompt], config)
            else:
                out = await asyncio.to_thread(cloud.generate, [prompt], config)
            if not out or not out[0]:
                raise CloudError("the cloud model returned no sample",
                                 reason="malformed_response")
            return list(out[0])
        except Exception as exc:
            return _as_cloud_error(exc)


def _edge_text(s: Samples) -> str:
    if s.greedy is None:
        raise InvalidParameterError(
            f"No edge answer was generated for prompt {prompt_text(s.prompt)[:60]!r}."
        )
    return s.greedy.text


def _as_cloud_error(exc: Exception) -> CloudError:
    if isinstance(exc, CloudError):
        return exc
    return CloudError(f"{type(exc).__name__}: {exc}", reason="exception")


