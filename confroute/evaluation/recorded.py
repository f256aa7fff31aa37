"""A LanguageModel that replays stored answers (offline routing simulations).

Datasets that ship real model outputs (GSM8K example solutions, HELM MMLU runs,
MT-Bench answer files) become edge or cloud models without running anything, and
scripted judge verdicts can drive the judge code paths in tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from confroute._validation import check_choice, check_prompts, param_error
from confroute.errors import ConfrouteError, InvalidParameterError
from confroute.evaluation.datasets import Example
from confroute.types import GenerationConfig, Prompt, Sample, prompt_key, prompt_text

__all__ = ["RecordedAnswerMissing", "RecordedModel"]


class RecordedAnswerMissing(ConfrouteError, KeyError):
    """A recorded model was asked a prompt it has no stored answer for."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RecordedModel:
    """Replay stored answers as a :class:`~confroute.models.base.LanguageModel`.

    Parameters
    ----------
    answers : mapping of str to str
        Stored answer per prompt.
    name : str
        Model name (keyword-only).
    key : {"prompt", "prompt_key"}, default "prompt"
        How a prompt is looked up: ``"prompt"`` uses its text (a plain string, or
        the last user turn of a conversation, :func:`confroute.types.prompt_text`);
        ``"prompt_key"`` uses the exact JSON identity of the whole prompt
        (:func:`confroute.types.prompt_key`).

    Notes
    -----
    ``generate`` returns ``config.n`` identical copies of the stored answer (a
    replay has no sampling randomness), cut at the first of ``config.stop``, with
    no logprobs or entropies. ``max_new_tokens`` is not applied (no tokenizer).
    A prompt without a stored answer raises :class:`RecordedAnswerMissing`; there
    is never a silent default.
    """

    def __init__(self, answers: Mapping[str, str], *, name: str, key: str = "prompt") -> None:
        owner = "RecordedModel"
        if not isinstance(answers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in answers.items()
        ):
            raise param_error("answers", owner, "a mapping of str prompts to str answers",
                              answers, type_error=True)
        if not isinstance(name, str) or not name:
            raise param_error("name", owner, "a non-empty str", name, type_error=True)
        self.key = check_choice(key, "key", owner, ("prompt", "prompt_key"))
        self.answers = dict(answers)
        self.name = name

    @classmethod
    def from_examples(cls, examples: Iterable[Example], model_name: str) -> RecordedModel:
        """Build from the ``recorded[model_name]`` answers of examples, keyed by prompt.

        Examples without an answer of ``model_name`` are left out (asking them
        raises :class:`RecordedAnswerMissing`).

        Raises
        ------
        InvalidParameterError
            If no example has an answer of ``model_name`` (the message lists the
            models that have some), or if two examples share a prompt but not
            the answer.
        """
        answers: dict[str, str] = {}
        seen_models: set[str] = set()
        for ex in examples:
            seen_models.update(ex.recorded)
            if model_name not in ex.recorded:
                continue
            ans = ex.recorded[model_name]
            if answers.get(ex.prompt, ans) != ans:
                raise InvalidParameterError(
                    f"The 'examples' parameter of RecordedModel.from_examples holds two "
                    f"different answers of {model_name!r} for the same prompt (example "
                    f"{ex.id!r}); key them by something unique."
                )
            answers[ex.prompt] = ans
        if not answers:
            raise InvalidParameterError(
                f"The 'model_name' parameter of RecordedModel.from_examples must name a model "
                f"with recorded answers. Got {model_name!r}; available: "
                f"{', '.join(sorted(seen_models)) or 'none'}."
            )
        return cls(answers, name=model_name)

    def _lookup(self, prompt: Prompt) -> str:
        k = prompt_text(prompt) if self.key == "prompt" else prompt_key(prompt)
        try:
            return self.answers[k]
        except KeyError:
            short = k if len(k) <= 80 else k[:77] + "..."
            raise RecordedAnswerMissing(
                f"RecordedModel {self.name!r} has no recorded answer for prompt {short!r} "
                f"({len(self.answers)} answers stored, looked up by {self.key})."
            ) from None

    def generate(self, prompts: Sequence[Prompt], config: GenerationConfig) -> list[list[Sample]]:
        """Stored answers, ``config.n`` copies per prompt (see class notes)."""
        if not isinstance(config, GenerationConfig):
            raise param_error("config", "RecordedModel.generate", "a GenerationConfig", config,
                              type_error=True)
        batch = check_prompts(prompts, "RecordedModel.generate")
        out: list[list[Sample]] = []
        for p in batch:
            text = self._lookup(p)
            for stop in config.stop:
                cut = text.find(stop)
                if cut >= 0:
                    text = text[:cut]
            out.append([Sample(text=text, finish_reason="stop") for _ in range(config.n)])
        return out

    def __repr__(self) -> str:
        return f"RecordedModel(name={self.name!r}, n_answers={len(self.answers)}, key={self.key!r})"
