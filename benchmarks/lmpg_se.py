"""lm-polygraph 0.7.0 SemanticEntropy on one prompt, for the B3 side-by-side.

Run only with the interpreter of a separate venv holding lm-polygraph (never a
dependency of confroute, never imported by it)::

    /tmp/lmpg/bin/python benchmarks/lmpg_se.py --model DIR --nli DIR --prompt TEXT

Prints one JSON line: {"seconds": [...], "note": ...}. Uses the same causal LM
folder, the same NLI model folder and the same (already templated) prompt as the
confroute run, N samples with the same sampling settings and max_new_tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--nli", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from lm_polygraph.defaults.register_default_stat_calculators import (
        register_default_stat_calculators,
    )
    from lm_polygraph.estimators import SemanticEntropy
    from lm_polygraph.utils.builder_enviroment_stat_calculator import (
        BuilderEnvironmentStatCalculator,
    )
    from lm_polygraph.utils.dataset import Dataset
    from lm_polygraph.utils.generation_parameters import GenerationParameters
    from lm_polygraph.utils.manager import UEManager
    from lm_polygraph.utils.model import WhiteboxModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                              dtype=torch.float32).eval()
    params = GenerationParameters(temperature=0.7, top_k=50, top_p=0.95,
                                  max_new_tokens=args.max_new_tokens)
    model = WhiteboxModel(lm, tok, model_path=args.model, generation_parameters=params)
    calculators = register_default_stat_calculators("Whitebox", output_attentions=False,
                                                    output_hidden_states=False)
    for c in calculators:
        cfg = c.cfg  # an OmegaConf DictConfig
        if "nli_model" in cfg:
            cfg["nli_model"]["deberta_path"] = args.nli
            cfg["nli_model"]["device"] = "cpu"
        if c.name == "SamplingGenerationCalculator" and args.n != 10:
            cfg["samples_n"] = args.n  # 10 is lm-polygraph's default

    # Seconds spent in each lm-polygraph stat calculator (sampling, NLI, ...).
    import lm_polygraph.stat_calculators as calc_mod

    spent: dict[str, float] = {}

    def timed_call(cls: type, real: object) -> object:
        def call(self: object, *a: object, **k: object) -> object:
            t0 = time.perf_counter()
            try:
                return real(self, *a, **k)  # type: ignore[operator]
            finally:
                spent[cls.__name__] = spent.get(cls.__name__, 0.0) + time.perf_counter() - t0
        return call

    for name in dir(calc_mod):
        cls = getattr(calc_mod, name)
        if isinstance(cls, type) and "__call__" in cls.__dict__:
            cls.__call__ = timed_call(cls, cls.__dict__["__call__"])  # type: ignore[method-assign]

    def once() -> float:
        man = UEManager(
            Dataset([args.prompt], [""], batch_size=1), model, [SemanticEntropy()],
            available_stat_calculators=calculators,
            builder_env_stat_calc=BuilderEnvironmentStatCalculator(model),
            generation_metrics=[], ue_metrics=[], processors=[],
            ignore_exceptions=False, verbose=False, max_new_tokens=args.max_new_tokens,
        )
        t0 = time.perf_counter()
        man()
        return time.perf_counter() - t0

    once()  # warm-up: loads the NLI model once
    spent.clear()
    seconds = [once() for _ in range(args.repeats)]
    parts = {k: round(v / args.repeats, 3) for k, v in sorted(spent.items()) if v > 0.005}
    print(json.dumps({"seconds": seconds, "parts": parts,
                      "note": f"lm-polygraph SemanticEntropy, N={args.n}, all-pairs NLI"}))


if __name__ == "__main__":
    main()
