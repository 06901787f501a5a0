"""An `EvalConfig` resolved into the parts the harness runs on: cases, prompt variants, generation parameters,
endpoint options, the judge, the embedder, the output and cache locations. Everything here can fail before the first
token is generated, which is the point: a typo costs seconds, not the minutes of a generation run.

The shell (`flywheel.pipelines.eval`) adds what needs MLflow: adapter downloads, the prompt registry, runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from flywheel.evals.prompts.config import EvalConfig
from flywheel.foundation.errors import FlywheelError, InputError

ROOT = Path(__file__).resolve().parents[2]  # the Flywheel checkout: its configs/prompts is the fallback


def prompts_dir(cfg: EvalConfig) -> Path:
    p = Path(cfg.prompts_dir)
    if p.is_dir() or p.is_absolute():
        return p
    return ROOT / p  # run from elsewhere: the repo's own configs/prompts


def is_uri(s: str) -> bool:
    return "://" in s or s.startswith(("runs:/", "models:/"))


def eval_cases(cfg: EvalConfig):
    """The config's cases. Asking for preference_accuracy reads a mined dataset's preference eval split
    (`preferences_eval.jsonl`) instead of `eval.jsonl`."""
    from flywheel.evals.prompts.cases import load_cases

    return load_cases(cfg.cases, limit=cfg.limit, preferences="preference_accuracy" in cfg.metrics)


def check_enough_cases(ecfg: EvalConfig, min_cases: int) -> None:
    n = len(eval_cases(ecfg).cases)
    if n < min_cases:
        raise InputError(f"min_cases {min_cases}: the eval suite has only {n} cases ({ecfg.cases}"
                         f"{f', limit {ecfg.limit}' if ecfg.limit else ''}); give more cases (eval.cases=...) or lower "
                         "min_cases")


class LazyEmbedder:
    """(outputs, references) -> cosine similarities. Loads the model (via the embeddings stage's offline loader)
    on the first call only, so a run whose similarities are all cached never imports sentence-transformers."""

    def __init__(self, name: str):
        self.name = name
        self._model = None

    def __call__(self, outputs, references):  # noqa: ANN001
        from flywheel.evals.prompts.scorers import embedding_similarity

        if self._model is None:
            from flywheel.evals.embeddings.models import load_embedding_model

            self._model = load_embedding_model(self.name)
        return embedding_similarity(self._model, outputs, references)


def endpoint_options(cfg: EvalConfig, extra_body: dict | None = None):
    from flywheel.evals.prompts.generate import EndpointOptions

    e = cfg.endpoints
    return EndpointOptions(connect_timeout_s=e.connect_timeout_s, read_timeout_s=e.read_timeout_s,
                           max_retries=e.max_retries, max_consecutive_failures=e.max_consecutive_failures,
                           extra_body=dict(extra_body or {}))


def gen_params(cfg: EvalConfig):
    """The one GenParams of a config: what every target gets and what results.json records."""
    from flywheel.evals.prompts.generate import GenParams

    g = cfg.generation
    return GenParams(max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, temperature=g.temperature,
                     top_p=g.top_p, top_k=g.top_k, min_p=g.min_p, repeat_penalty=g.repeat_penalty, seed=g.seed,
                     stop=tuple(g.stop), batch_size=g.batch_size)


def make_judge(cfg: EvalConfig):
    """The judge: a score, or NoScore("failed") for a request that failed after retries, NoScore("unparseable")
    for a reply without `Score: N`; both are counted per cell."""
    import openai

    from flywheel.evals.prompts.generate import GenParams, chat_completion, check_endpoint, openai_client
    from flywheel.evals.prompts.scorers import DEFAULT_RUBRIC, NoScore, judge_messages, parse_judge_score

    j = cfg.judge
    key = os.environ.get(j.api_key_env) if j.api_key_env else None
    check_endpoint(j.endpoint, key, timeout=cfg.endpoints.connect_timeout_s, what="judge endpoint")
    client = openai_client(j.endpoint, key, endpoint_options(cfg))
    params = GenParams(max_new_tokens=64)  # greedy, no repeat penalty: the same judgement every time

    def judge(question: str, answer: str, reference: str | None) -> float | None:
        try:
            reply = chat_completion(client, j.model or "default",
                                    judge_messages(j.rubric or DEFAULT_RUBRIC, question, answer, reference), params)
        except (openai.APIError, ValueError) as e:
            raise NoScore("failed", f"{type(e).__name__}: {e}"[:200]) from None
        score = parse_judge_score(reply.text)
        if score is None:
            raise NoScore("unparseable", reply.text[:80])
        return score

    return judge


@dataclass
class Plan:
    """What `plan` resolved without generating anything; the later phases read it."""

    caseset: Any
    variants: list[Any]
    params: Any
    out_dir: Path
    cache: Any
    metrics: list[str]
    judge: Any
    pairs: Optional[list] = None  # configured compare pairs; None: harness.auto_pairs


def target_names(cfg: EvalConfig) -> list[str]:
    return [t.name for t in cfg.targets] + (["candidate"] if cfg.candidate else [])


def plan(cfg: EvalConfig) -> Plan:
    """Everything that can be wrong, before generation (targets are resolved later, in the scratch dir)."""
    from flywheel.evals.prompts import harness
    from flywheel.evals.prompts.templates import load_template
    from flywheel.foundation.cache import JsonCache
    from flywheel.foundation.io import check_output_dir, flywheel_home

    caseset = eval_cases(cfg)
    variants = [load_template(v, prompts_dir(cfg)) for v in cfg.variants]
    if cfg.primary_metric not in cfg.metrics + ["pass_rate", "error_rate"]:
        raise InputError(f"primary_metric {cfg.primary_metric!r} is not among metrics {cfg.metrics}")
    harness.validate_static(caseset.cases, variants, target_names(cfg), cfg.assertions, cfg.metrics)
    params = gen_params(cfg)
    out_dir = Path(cfg.out) if cfg.out else flywheel_home() / "eval" / cfg.name
    check_output_dir(out_dir, inputs=[cfg.cases], force=cfg.force)  # now, not after the generation
    cache = JsonCache(Path(cfg.cache_dir) if cfg.cache_dir else flywheel_home() / "cache" / "eval",
                      enabled=cfg.cache)
    metrics = list(cfg.metrics)
    if cfg.judge.endpoint and "judge_score" not in metrics:
        metrics.append("judge_score")  # configuring a judge is asking for its score
    judge = make_judge(cfg) if cfg.judge.endpoint else None
    pairs = None
    if cfg.compare.pairs:
        pairs = harness.configured_pairs([(p.control, p.treatment) for p in cfg.compare.pairs],
                                         [v.name for v in variants], target_names(cfg))
    return Plan(caseset, variants, params, out_dir, cache, metrics, judge, pairs)


def cells_table(rows: list[dict]) -> dict[str, list]:
    """Per-case table (for mlflow.log_table): generations side by side with their scores."""
    names = sorted({k for r in rows for k in r["metrics"]})
    t: dict[str, list] = {"case_id": [], "question": [], "reference": [], "output": [], "error": [],
                          "cached": [], "failed_assertions": []}
    t.update({f"m.{n}": [] for n in names})
    for r in rows:
        t["case_id"].append(r["case_id"])
        t["question"].append(r["question"])
        t["reference"].append(r["reference"])
        t["output"].append(r["output"])
        t["error"].append(r["error"])
        t["cached"].append(r["cached"])
        t["failed_assertions"].append("; ".join(f"{a['name']}: {a['reason']}" for a in r["assertions"]
                                                if not a["passed"]))
        for n in names:
            t[f"m.{n}"].append(r["metrics"].get(n))
    return t


def check_failures(results: dict) -> None:
    """A broken target is an error (exit 2), not a gate "fail": raise when a cell's share of failed generations
    is above `max_failure_rate`. Called after results.json is written, so the failures can be read there."""
    limit = results.get("max_failure_rate", 0.0)
    bad = [(label, f) for label, f in results["failures"].items() if f["failure_rate"] > limit]
    if bad:
        parts = "; ".join(f"{label}: {f['failed']}/{f['rows']} failed (first: {f['first_error']})"[:300]
                          for label, f in bad)
        raise FlywheelError(f"eval: generations failed above max_failure_rate={limit:g}: {parts}; results in "
                            f"{results.get('results_path', 'results.json')}")


def cells_and_comparisons(cfg: EvalConfig, plan: Plan, rows: list[dict],
                          targets: list[str]) -> tuple[list[dict], list[dict], list[str]]:
    """(cells with CIs, paired comparisons, notes) of the generated rows."""
    from flywheel.evals.prompts import harness

    cells = harness.cells(rows, alpha=cfg.compare.alpha)
    pairs = plan.pairs or harness.auto_pairs([v.name for v in plan.variants], targets)
    comparisons, notes = harness.compare(rows, pairs, alpha=cfg.compare.alpha, correction=cfg.compare.correction,
                                         test=cfg.compare.test)
    return cells, comparisons, notes


def results(cfg: EvalConfig, plan: Plan, *, run_id: str, targets: list[Any], rows: list[dict], cells: list[dict],
            comparisons: list[dict], notes: list[str], child_runs: dict[str, str],
            prompt_uris: dict[str, str]) -> dict:
    """The results.json dict."""
    from flywheel.evals.prompts import harness
    from flywheel.evals.prompts.results import build_results

    g, params, cache = cfg.generation, plan.params, plan.cache
    # What was evaluated, by identity (base/adapter sha256) and by the reference given (a registry
    # version such as models:/name/3): the gate refuses to promote on results about other models.
    refs = {t.name: t.adapter for t in cfg.targets} | ({"candidate": cfg.candidate} if cfg.candidate else {})
    return build_results(
        name=cfg.name, run_id=run_id, child_runs=child_runs, primary_metric=cfg.primary_metric,
        caseset=plan.caseset, targets=[{**t.describe(), "adapter_ref": refs.get(t.name)} for t in targets],
        cells=cells, comparisons=comparisons,
        variants=[{"name": v.name, "version": v.version, "sha256": v.sha256, "source": v.source,
                   "prompt_uri": prompt_uris.get(v.name)} for v in plan.variants],
        # every sampling parameter as sent (greedy spelled out: temperature 0, top_k 1): what publish pins
        generation={**params.sampling(), "do_sample": params.do_sample, "repeat": g.repeat,
                    "batch_size": g.batch_size},
        cache={"hits": cache.hits, "misses": cache.misses, "dir": str(cache.root)}, rows=rows,
        failures=harness.failures(rows), max_failure_rate=cfg.max_failure_rate, notes=notes)
