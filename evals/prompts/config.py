"""The `flywheel eval` config: cases, prompt variants, targets, metrics, generation and the paired comparisons.

Run with: flywheel eval --config configs/eval/demo.yaml [cases=DIR|FILE] [limit=N] [out=DIR] [key=value ...]
`flywheel.pipelines.config.load_config` reads a YAML file plus `key=value` overrides into `EvalConfig`; the gate
reads the same model back from an eval's `config.yaml` when it re-runs a suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from flywheel.evals.ab.multiple import CorrectionMethod
from flywheel.evals.prompts.scorers import default_metrics
from flywheel.foundation.config import StageConfig

DEFAULT_CASES = str(Path(__file__).resolve().parent / "demo_cases.yaml")
DEFAULT_BASE = "smollm2-135m-instruct"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class TargetSpec(_Section):
    """One model answering the cases: a local base model (+/- a LoRA adapter), or an OpenAI-compatible endpoint."""

    name: str = Field(description="the target's name in results.json, the comparisons and the gate's rules")
    base: Optional[str] = Field(None, description=(
        f"base model: a catalog name or a Hugging Face model dir; default: the adapter's recorded base, else "
        f"{DEFAULT_BASE}"))
    adapter: Optional[str] = Field(None, description=(
        "LoRA adapter: a directory, `runs:/<run_id>/adapter` or `models:/<name>@<alias>` (downloaded from MLflow)"))
    endpoint: Optional[str] = Field(None, description=(
        "OpenAI-compatible base URL (e.g. http://localhost:11434/v1): answers come from the server, no local model"))
    model: Optional[str] = Field(None, description="endpoint: the served model's name; default: 'default'")
    api_key_env: Optional[str] = Field(None, description=(
        "endpoint: the environment variable holding the API key (never the key itself in a config)"))
    revision: Optional[str] = Field(None, description=(
        "endpoint: what identifies the served weights when the server reports nothing (e.g. the GGUF's sha256); "
        "part of the cache key. Without it and without a server fingerprint, endpoint answers are not cached"))
    extra_body: dict[str, Any] = Field(default_factory=dict, description=(
        "endpoint: extra request fields merged over the sampling fields Flywheel sends (a null drops one, e.g. "
        "`{top_k: null}` for a server that rejects it)"))


class GenerationSection(_Section):
    """Sampling settings, the same for every target; results.json records them and `publish` pins them."""

    max_new_tokens: int = Field(48, ge=1, description=(
        "tokens generated per answer; short on CPU (48 tokens x 2 variants x 2 targets stays in minutes)"))
    do_sample: bool = Field(False, description=(
        "false: greedy (deterministic, cache-friendly); true: sample, e.g. with `repeat` for a consistency rate"))
    temperature: float = Field(0.7, gt=0, description="sampling only: temperature; greedy sends 0")
    top_p: float = Field(0.95, gt=0, le=1, description="sampling only: nucleus top-p")
    top_k: int = Field(0, ge=0, description="sampling only: top-k (0 = off); greedy sends top_k 1")
    min_p: float = Field(0.0, ge=0, le=1, description="sampling only: min-p (0 = off; llama.cpp defaults to 0.05)")
    repeat_penalty: float = Field(1.0, gt=0, description=(
        "repetition penalty, sent to every target and pinned in the published Modelfile (llama.cpp and Ollama "
        "default to 1.1, Hugging Face to 1.0)"))
    stop: list[str] = Field(default_factory=list, description="extra stop strings (end-of-turn tokens always stop)")
    seed: int = Field(0, description="sampling seed (each batch: seed, repeat, batch number); sent to endpoints")
    batch_size: int = Field(8, ge=1, description="prompts per generate call on a local model")
    repeat: int = Field(1, ge=1, description=(
        "answers per case; > 1 with do_sample gives a per-case consistency rate (greedy repeats are identical)"))


class EndpointSection(_Section):
    """How requests to endpoint targets and the judge behave."""

    connect_timeout_s: float = Field(5.0, gt=0, description="endpoint and judge requests: connect timeout, seconds")
    read_timeout_s: float = Field(60.0, gt=0, description="endpoint and judge requests: read timeout, seconds")
    max_retries: int = Field(3, ge=0, description=(
        "retries per request on 408/409/429/5xx and connection errors, exponential backoff with jitter "
        "(openai SDK; Retry-After honoured)"))
    max_consecutive_failures: int = Field(5, ge=1, description=(
        "abort the run, naming the target, after this many failed requests in a row"))


class JudgeSection(_Section):
    """An LLM judge scoring each answer (metric `judge_score`); unset endpoint = no judge."""

    endpoint: Optional[str] = Field(None, description=(
        "OpenAI-compatible base URL of the judge; unset: the judge is skipped (noted in results.json)"))
    model: Optional[str] = Field(None, description="the judge's model name; default: 'default'")
    api_key_env: Optional[str] = Field(None, description=(
        "the environment variable holding the judge's API key (never the key itself in a config)"))
    rubric: Optional[str] = Field(None, description=(
        "the judge's instructions; default: flywheel.evals.prompts.scorers.DEFAULT_RUBRIC"))


class ComparePair(_Section):
    control: dict[str, str] = Field(description="the control cell: {variant, target}")
    treatment: dict[str, str] = Field(description="the treatment cell: {variant, target}")


class CompareSection(_Section):
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level; cell CIs are 1 - alpha")
    correction: CorrectionMethod = Field("holm", description=(
        "per metric, across the compared pairs (flywheel.evals.ab.multiple)"))
    test: Literal["auto", "t", "wilcoxon", "mcnemar"] = Field("auto", description=(
        "paired test (flywheel.evals.ab.paired): auto picks McNemar for 0/1 scores, Wilcoxon for ordinal or "
        "non-normal differences, else t"))
    pairs: Optional[list[ComparePair]] = Field(None, description="pairs to compare; default: each variant vs the "
                                               "first, each target vs the first")


class EvalConfig(StageConfig):
    """Prompt variants x targets x cases; defaults run the two demo prompts on the base model, on CPU."""

    name: str = Field("eval", description="the suite's name: run name, default output dir, results.json `name`")
    cases: str = Field(DEFAULT_CASES, description=(
        "a mined dataset dir (its eval split), a JSONL/YAML cases file, a preference-pairs .jsonl or an oasst1 "
        "message table; default: the built-in demo cases"))
    limit: Optional[int] = Field(None, ge=1, description="use the first N cases only")
    out: Optional[str] = Field(None, description="output dir; default: <FLYWHEEL_HOME>/eval/<name>")
    force: bool = Field(False, description="replace an existing `out` Flywheel did not write")
    variants: list[str] = Field(["concise", "grounded"], description=(
        "prompt variants: names looked up in prompts_dir (<name>.yaml), or paths to template files"))
    prompts_dir: str = Field("configs/prompts", description=(
        "where bare variant names are looked up (relative: the working directory, then the Flywheel checkout)"))
    targets: list[TargetSpec] = Field([TargetSpec(name="base", base=DEFAULT_BASE)], description=(
        "the models answering the cases; the first is the control of the automatic comparisons"))
    candidate: Optional[str] = Field(None, description=(
        "shortcut: adds the target {name: candidate, adapter: <this>} (a dir, runs:/ or models:/ URI)"))
    metrics: list[str] = Field(default_factory=default_metrics, description=(
        "scorers to compute (flywheel.evals.prompts.scorers registry); default: every default scorer"))
    assertions: list[dict[str, Any]] = Field([], description=(
        "assertions applied to every case on top of each case's own, e.g. [{type: contains, value: ...}]"))
    embedding_model: str = Field("all-MiniLM-L6-v2", description=(
        "sentence-transformers model for embedding_similarity (loaded only when a similarity is not cached)"))
    primary_metric: str = Field("nll", description=(
        "the metric the gate decides on (its direction is recorded in results.json)"))
    generation: GenerationSection = Field(GenerationSection(), description="sampling settings for every target")
    judge: JudgeSection = Field(JudgeSection(), description="optional LLM judge (metric judge_score)")
    compare: CompareSection = Field(CompareSection(), description="paired comparisons between cells")
    endpoints: EndpointSection = Field(default_factory=EndpointSection, description=(
        "timeouts, retries and abort policy for endpoint targets and the judge"))
    max_failure_rate: float = Field(0.0, ge=0, le=1, description=(
        "a cell whose share of failed generations is above this makes `flywheel eval` exit 2 (results are still "
        "written); the gate refuses a primary cell with any failure"))
    nll_batch_size: int = Field(4, ge=1, description="sequences per forward pass when scoring reference NLL")
    nll_max_length: int = Field(384, ge=16, description=(
        "prompt + reference tokens for NLL; a longer reference is cut at the end"))
    cache: bool = Field(True, description="reuse generations and scores cached on disk (keyed by model identity, "
                        "prompt and sampling settings)")
    cache_dir: Optional[str] = Field(None, description="generation cache; default: <FLYWHEEL_HOME>/cache/eval")
    register_prompts: bool = Field(True, description=(
        "register each variant in MLflow's prompt registry (flywheel-<variant>) and link it to the runs"))
    log_traces: bool = Field(False, description=(
        "record each generation as an MLflow trace (messages in, answer out; tags target, variant, case_id) with "
        "its scores as assessments, linked to the eval run (flywheel.pipelines.eval_traces)"))
    device: str = Field("cpu", description="torch device for local targets: cpu, cuda, cuda:1, mps")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI; default: Flywheel's store")
    run_name: Optional[str] = Field(None, description="the MLflow run's name; default: eval-<name>")
