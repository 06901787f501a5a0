"""`flywheel eval`: prompt variants x targets x cases, scored, compared on the same cases, logged to MLflow.

    flywheel eval --config configs/eval/demo.yaml [cases=DIR|FILE] [limit=N] [out=DIR] [key=value ...]

Recipe:
1. Load cases (a mined dataset dir, a JSONL/YAML cases file, or an oasst1 message table) and prompt variants
   (`configs/prompts/<name>.yaml`); check every template field and assertion against every case, resolve every
   target (base model, adapter from a dir / `runs:/` / `models:/name@alias`, endpoint) and refuse an adapter
   trained on another base: all before the first token is generated.
2. Register each variant in MLflow's prompt registry (`flywheel-<variant>`, a new version only when the text
   changed) and link it to the runs, so a run records exactly which prompt it used.
3. Generate (batched, greedy by default, cached on disk), score, build cells (mean + CI) and paired comparisons.
4. Write `out/results.json` (what the gate reads), `out/cases.jsonl` (per-case table), `out/config.yaml`; log
   the parent run (experiment `flywheel/prompts`, artifact `results.json`) and one child run per variant x target
   (params variant/target/prompt_version, metrics = cell means, `cases.json` table).

Python entry: `run_eval(cfg: EvalConfig) -> {"run_id", "results_path", "results", "out"}`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from flywheel.evals.prompts.config import DEFAULT_BASE, EvalConfig, TargetSpec
from flywheel.evals.prompts.results import build_results
from flywheel.pipelines.config import load_config
from flywheel.foundation.errors import FlywheelError, InputError
from flywheel.pipelines import tags as T

ROOT = Path(__file__).resolve().parents[1]


# -- resolution (before any generation) -----------------------------------------------------------------------

def _prompts_dir(cfg: EvalConfig) -> Path:
    p = Path(cfg.prompts_dir)
    if p.is_dir() or p.is_absolute():
        return p
    return ROOT / p  # run from elsewhere: the repo's own configs/prompts


def _is_uri(s: str) -> bool:
    return "://" in s or s.startswith(("runs:/", "models:/"))


def _fetch_adapter(spec: str, target: str, scratch: Path) -> tuple[Path, dict[str, str]]:
    """A local dir as is; an MLflow URI downloaded (mlflow resolves `models:/name@alias` to its source)."""
    if not _is_uri(spec):
        p = Path(spec).expanduser()
        if not p.exists():
            raise InputError(f"target {target!r}: adapter {spec}: no such directory")
        return p, {}
    import mlflow

    lineage = {}
    if spec.startswith("runs:/"):
        lineage[T.IN_TRAIN_RUN] = spec[len("runs:/"):].split("/", 1)[0]
    elif spec.startswith("models:/"):
        lineage[T.IN_MODEL_URI] = spec
    dst = scratch / target
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=str(dst))
    except Exception as e:  # noqa: BLE001 - any registry/store failure is a bad input for the user
        raise InputError(f"target {target!r}: adapter {spec}: cannot download ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    return Path(local), lineage


def build_targets(cfg: EvalConfig, scratch: Path) -> tuple[list[Any], dict[str, str]]:
    """TargetSpec -> HFTarget/EndpointTarget; returns (targets, lineage tags)."""
    from flywheel.evals.prompts.generate import EndpointTarget, HFTarget, load_adapter
    from flywheel.training.models import resolve_base_model

    targets, lineage = [], {}
    specs = list(cfg.targets)
    if cfg.candidate:
        specs.append(TargetSpec(name="candidate", adapter=cfg.candidate))
    for spec in specs:
        if spec.endpoint:
            if spec.adapter:
                raise InputError(f"target {spec.name!r}: an endpoint target cannot take a local adapter")
            key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
            targets.append(EndpointTarget(spec.name, spec.endpoint, spec.model or "default", api_key=key,
                                          options=_endpoint_options(cfg, spec.extra_body), revision=spec.revision))
            continue
        adapter = None
        if spec.adapter:
            path, lin = _fetch_adapter(spec.adapter, spec.name, scratch)
            adapter = load_adapter(path)
            for k, v in lin.items():
                lineage[f"{k}.{spec.name}" if k in lineage else k] = v
            if adapter.meta.get("train_run_id"):
                lineage.setdefault("train_run", adapter.meta["train_run_id"])
        base = spec.base or (adapter.meta.get("base_model") if adapter else None) or DEFAULT_BASE
        info = resolve_base_model(base)
        targets.append(HFTarget(spec.name, info.name, info.path, info.sha256, adapter=adapter, device=cfg.device))
    return targets, lineage


class _LazyEmbedder:
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


def _endpoint_options(cfg: EvalConfig, extra_body: dict | None = None):
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


def _judge(cfg: EvalConfig):
    """The judge: a score, or NoScore("failed") for a request that failed after retries, NoScore("unparseable")
    for a reply without `Score: N`; both are counted per cell."""
    import openai

    from flywheel.evals.prompts.generate import GenParams, chat_completion, check_endpoint, openai_client
    from flywheel.evals.prompts.scorers import DEFAULT_RUBRIC, NoScore, judge_messages, parse_judge_score

    j = cfg.judge
    key = os.environ.get(j.api_key_env) if j.api_key_env else None
    check_endpoint(j.endpoint, key, timeout=cfg.endpoints.connect_timeout_s, what="judge endpoint")
    client = openai_client(j.endpoint, key, _endpoint_options(cfg))
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


# -- prompt registry ------------------------------------------------------------------------------------------

def register_prompt(template: Any) -> Any:
    """`flywheel-<name>` in MLflow's prompt registry; a new version only when the text changed."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name = f"flywheel-{template.name}"
    try:
        for pv in client.search_prompt_versions(name):
            if (pv.tags or {}).get(T.PROMPT_SHA256) == template.sha256:
                return pv
    except MlflowException:
        pass  # first registration of this prompt
    return client.register_prompt(
        name, template.chat_template(), commit_message=f"{template.source} version {template.version}",
        tags={T.PROMPT_SHA256: template.sha256, T.PROMPT_VERSION: template.version,
              T.PROMPT_SOURCE: template.source})


# -- the stage ------------------------------------------------------------------------------------------------

def demo_config(cases: str | Path, candidate: str | None = None, out: str | Path | None = None,
                **overrides: Any) -> EvalConfig:
    """The demo suite (`configs/eval/demo.yaml`) on `cases` (e.g. the demo dataset dir), base vs `candidate`
    (an adapter dir or `runs:/<id>/adapter`). What `flywheel demo` / `flywheel run` call before `run_eval`."""
    cfg = load_config(EvalConfig, ROOT / "configs" / "eval" / "demo.yaml")
    cfg.cases = str(cases)
    cfg.candidate = str(candidate) if candidate else None
    if out:
        cfg.out = str(out)
    for k, v in overrides.items():  # validated on assignment (StageConfig)
        setattr(cfg, k, v)
    return cfg


def eval_cases(cfg: EvalConfig):
    """The config's cases. Asking for preference_accuracy reads a mined dataset's preference eval split
    (`preferences_eval.jsonl`) instead of `eval.jsonl`."""
    from flywheel.evals.prompts.cases import load_cases

    return load_cases(cfg.cases, limit=cfg.limit, preferences="preference_accuracy" in cfg.metrics)


def _progress(bar: Any, task: Any, show: bool):
    """The bar advances per case; a failure is printed above it as it happens and counted in its label."""
    failed = [0]

    def update(phase: str, n: int, detail: str | None = None) -> None:
        if phase == "failed":
            failed[0] += n
            if show:
                bar.console.print(f"[red]failed:[/] {detail}")
            bar.update(task, description=f"generate ({failed[0]} failed)")
            return
        label = phase if not failed[0] else f"{phase} ({failed[0]} failed)"
        bar.update(task, advance=n if phase == "generate" else 0, description=label)

    return update


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


@dataclass
class _Plan:
    """What phase 1 resolved without generating anything; the later phases read it."""

    caseset: Any
    variants: list[Any]
    params: Any
    out_dir: Path
    cache: Any
    metrics: list[str]
    judge: Any
    pairs: Optional[list] = None  # configured compare pairs; None: harness.auto_pairs


def _plan(cfg: EvalConfig) -> _Plan:
    """Phase 1: everything that can be wrong, before generation (targets are resolved later, in the scratch dir)."""
    from flywheel.evals.prompts import harness
    from flywheel.evals.prompts.templates import load_template
    from flywheel.foundation.cache import JsonCache
    from flywheel.foundation.io import check_output_dir
    from flywheel.pipelines import tracking

    caseset = eval_cases(cfg)
    variants = [load_template(v, _prompts_dir(cfg)) for v in cfg.variants]
    if cfg.primary_metric not in cfg.metrics + ["pass_rate", "error_rate"]:
        raise InputError(f"primary_metric {cfg.primary_metric!r} is not among metrics {cfg.metrics}")
    target_names = [t.name for t in cfg.targets] + (["candidate"] if cfg.candidate else [])
    harness.validate_static(caseset.cases, variants, target_names, cfg.assertions, cfg.metrics)
    params = gen_params(cfg)
    out_dir = Path(cfg.out) if cfg.out else tracking.flywheel_home() / "eval" / cfg.name
    check_output_dir(out_dir, inputs=[cfg.cases], force=cfg.force)  # now, not after the generation
    cache = JsonCache(Path(cfg.cache_dir) if cfg.cache_dir else tracking.flywheel_home() / "cache" / "eval",
                      enabled=cfg.cache)
    metrics = list(cfg.metrics)
    if cfg.judge.endpoint and "judge_score" not in metrics:
        metrics.append("judge_score")  # configuring a judge is asking for its score
    judge = _judge(cfg) if cfg.judge.endpoint else None
    pairs = None
    if cfg.compare.pairs:
        pairs = harness.configured_pairs([(p.control, p.treatment) for p in cfg.compare.pairs],
                                         [v.name for v in variants], target_names)
    return _Plan(caseset, variants, params, out_dir, cache, metrics, judge, pairs)


def _register_prompts(cfg: EvalConfig, plan: _Plan, run_id: str) -> dict[str, Any]:
    """Each variant in the prompt registry, linked to the parent run. -> {variant name: prompt version}."""
    from mlflow.tracking import MlflowClient

    prompt_versions = {}
    if cfg.register_prompts:
        for v in plan.variants:
            pv = register_prompt(v)
            MlflowClient().link_prompt_version_to_run(run_id, pv)
            prompt_versions[v.name] = pv
    return prompt_versions


def _generate(cfg: EvalConfig, plan: _Plan, targets: list[Any], show_progress: bool) -> dict:
    """Phase 2: the matrix, under a progress bar. -> harness.run_matrix's {rows, notes}."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flywheel.evals.prompts import harness

    g = cfg.generation
    embedder = _LazyEmbedder(cfg.embedding_model) if "embedding_similarity" in plan.metrics else None
    total = len(targets) * len(plan.variants) * len(plan.caseset.cases) * g.repeat
    with Progress(TextColumn("[bold]eval[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=not show_progress, transient=True) as bar:
        task = bar.add_task("generate", total=total)
        return harness.run_matrix(
            plan.caseset.cases, plan.variants, targets, params=plan.params, cache=plan.cache, metrics=plan.metrics,
            suite_assertions=cfg.assertions, repeat=g.repeat, embedder=embedder, judge=plan.judge,
            nll_batch_size=cfg.nll_batch_size, nll_max_length=cfg.nll_max_length,
            progress=_progress(bar, task, show_progress))


def _log_cells(plan: _Plan, targets: list[Any], rows: list[dict], cells: list[dict], prompt_versions: dict,
               inputs: dict) -> dict[str, str]:
    """Phase 3: one child run per variant x target. -> {"target/variant": run id}."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from flywheel.pipelines import tracking

    child_runs = {}
    for v in plan.variants:
        for t in targets:
            cell_rows = [r for r in rows if r["variant"] == v.name and r["target"] == t.name]
            pv = prompt_versions.get(v.name)
            with tracking.start_run("prompts", f"{t.name}/{v.name}", nested=True,
                                    inputs=inputs,
                                    params={"variant": v.name, "target": t.name,
                                            "prompt_version": v.version,
                                            "prompt_uri": pv.uri if pv else None,
                                            "target_identity": t.identity,
                                            "n_cases": len(cell_rows)}) as child:
                if pv is not None:
                    MlflowClient().link_prompt_version_to_run(child.info.run_id, pv)
                tracking.log_metrics({c["metric"]: c["mean"] for c in cells
                                      if c["variant"] == v.name and c["target"] == t.name})
                mlflow.log_table(_table(cell_rows), artifact_file="cases.json")
                child_runs[f"{t.name}/{v.name}"] = child.info.run_id
    return child_runs


def _results(cfg: EvalConfig, plan: _Plan, run_id: str, targets: list[Any], matrix: dict, prompt_versions: dict,
             inputs: dict) -> dict:
    """Cells, comparisons and child runs -> the results.json dict."""
    from flywheel.evals.prompts import harness

    rows = matrix["rows"]
    cells = harness.cells(rows, alpha=cfg.compare.alpha)
    pairs = plan.pairs or harness.auto_pairs([v.name for v in plan.variants], [t.name for t in targets])
    comparisons, cmp_notes = harness.compare(rows, pairs, alpha=cfg.compare.alpha,
                                             correction=cfg.compare.correction, test=cfg.compare.test)
    child_runs = _log_cells(plan, targets, rows, cells, prompt_versions, inputs)
    g, params, cache = cfg.generation, plan.params, plan.cache
    # What was evaluated, by identity (base/adapter sha256) and by the reference given (a registry
    # version such as models:/name/3): the gate refuses to promote on results about other models.
    refs = {t.name: t.adapter for t in cfg.targets} | ({"candidate": cfg.candidate} if cfg.candidate else {})
    return build_results(
        name=cfg.name, run_id=run_id, child_runs=child_runs, primary_metric=cfg.primary_metric,
        caseset=plan.caseset, targets=[{**t.describe(), "adapter_ref": refs.get(t.name)} for t in targets],
        cells=cells, comparisons=comparisons,
        variants=[{"name": v.name, "version": v.version, "sha256": v.sha256, "source": v.source,
                   "prompt_uri": prompt_versions[v.name].uri if v.name in prompt_versions else None}
                  for v in plan.variants],
        # every sampling parameter as sent (greedy spelled out: temperature 0, top_k 1): what publish pins
        generation={**params.sampling(), "do_sample": params.do_sample, "repeat": g.repeat,
                    "batch_size": g.batch_size},
        cache={"hits": cache.hits, "misses": cache.misses, "dir": str(cache.root)}, rows=rows,
        failures=harness.failures(rows), max_failure_rate=cfg.max_failure_rate, notes=matrix["notes"] + cmp_notes)


def _write(cfg: EvalConfig, plan: _Plan, results: dict, rows: list[dict]) -> None:
    """Phase 4: results.json, cases.jsonl, config.yaml (atomically), then the parent run's artifacts and metrics."""
    import mlflow

    from flywheel.foundation.io import atomic_dir, write_json, write_jsonl
    from flywheel.pipelines import tracking

    out_dir = plan.out_dir
    with atomic_dir(out_dir, force=cfg.force, inputs=[cfg.cases], stage="eval") as tmp:
        write_json(tmp / "results.json", results)
        write_jsonl(tmp / "cases.jsonl", rows)
        (tmp / "config.yaml").write_text(_yaml(cfg), encoding="utf-8")
    mlflow.log_artifact(str(out_dir / "results.json"))
    mlflow.log_artifact(str(out_dir / "config.yaml"))
    pm = [c for c in results["cells"] if c["metric"] == cfg.primary_metric]
    tracking.log_metrics({f"{c['target']}.{c['variant']}.{c['metric']}": c["mean"] for c in pm})
    tracking.log_metrics({"cases": len(plan.caseset.cases), "generated": results["generated"],
                          "failures": sum(f["failed"] for f in results["failures"].values()),
                          "cache_hits": plan.cache.hits})


def run_eval(cfg: EvalConfig, *, show_progress: bool = True, fail_on_failures: bool = True) -> dict:
    """Evaluate `cfg.variants` x `cfg.targets` on `cfg.cases`. Returns {run_id, results_path, results, out}.
    Raises FlywheelError (after writing the results) when generations failed above `cfg.max_failure_rate`."""
    import tempfile

    from flywheel.pipelines import tracking
    from flywheel.pipelines.config import flatten

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    plan = _plan(cfg)
    tracking.setup(cfg.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="flywheel-eval-") as scratch:
        targets, lineage = build_targets(cfg, Path(scratch))
        for t in targets:  # an unreachable endpoint fails here, before the MLflow run exists
            t.check()
        inputs = {T.IN_CASES: plan.caseset.path, T.IN_DATASET_VERSION: plan.caseset.dataset_version, **lineage}
        with tracking.start_run("prompts", cfg.run_name or f"eval-{cfg.name}", inputs=inputs,
                                params=flatten(cfg.model_dump(mode="json")), configured_uri=cfg.tracking_uri,
                                tags={T.EVAL_PRIMARY_METRIC: cfg.primary_metric}) as parent:
            prompt_versions = _register_prompts(cfg, plan, parent.info.run_id)
            matrix = _generate(cfg, plan, targets, show_progress)
            results = _results(cfg, plan, parent.info.run_id, targets, matrix, prompt_versions, inputs)
            _write(cfg, plan, results, matrix["rows"])
    res = {"run_id": results["run_id"], "results_path": str(plan.out_dir / "results.json"), "results": results,
           "out": str(plan.out_dir)}
    if fail_on_failures:
        check_failures({**results, "results_path": res["results_path"]})
    return res


def _table(rows: list[dict]) -> dict[str, list]:
    """Per-case table for mlflow.log_table: generations side by side with their scores."""
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


def _yaml(cfg: EvalConfig) -> str:
    import yaml

    return "# flywheel eval --config <this file>   (resolved config of this run)\n" + yaml.safe_dump(
        cfg.model_dump(mode="json"), sort_keys=False)


def _summary(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    results = res["results"]
    console = Console()
    metrics = [m for m in results["metrics"]]
    # Metrics as rows, cells as columns: there are more metrics than cells, and terminals are narrow.
    table = Table(title=f"eval {results['name']}: {results['cases']['n']} cases")
    table.add_column("metric")
    cols = [(t["name"], v["name"]) for t in results["targets"] for v in results["variants"]]
    for t, v in cols:
        table.add_column(f"{t}/{v}", justify="right")
    cells = {(c["target"], c["variant"], c["metric"]): c for c in results["cells"]}
    for m in metrics:
        d = results["metrics"][m]["direction"]
        vals = []
        for t, v in cols:
            c = cells.get((t, v, m))
            vals.append("" if c is None or c["mean"] is None else f"{c['mean']:.3g}")
        table.add_row(m + (" ↓" if d == "lower" else " ↑" if d == "higher" else ""), *vals)
    console.print(table)
    for label, f in results["failures"].items():
        if f["failed"]:
            console.print(f"[red]failures:[/] {label}: {f['failed']} of {f['rows']} generations failed "
                          f"(first: {f['first_error']})")
        for kind, n in f["misses"].items():
            console.print(f"[yellow]no score:[/] {label}: {n} x {kind}")
    for c in results["comparisons"]:
        if c["metric"] == results["primary_metric"]:
            console.print(f"{c['variant']} vs {c['control']} {c['metric']}: {c['estimate']:+.4f} "
                          f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] p_adj={c['p_adjusted']:.3g} -> {c['outcome']}")
    for n in results["notes"]:
        console.print(f"[yellow]note:[/] {n}")
    console.print(f"cache: {results['cache']['hits']} hits, {results['cache']['misses']} misses; "
                  f"results: {res['results_path']}; run {res['run_id']}")


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. cases=DIR limit=20 out=DIR"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="configs/eval/<suite>.yaml"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or summary table"),
        force: bool = typer.Option(False, "--force", help="replace an existing --out directory Flywheel did not write"),
    ) -> None:
        """Prompt variants x targets x cases: assertions, reference metrics, NLL; matrix + paired comparisons."""
        cfg = load_config(EvalConfig, config, (overrides or []) + (["force=true"] if force else []))
        res = run_eval(cfg, show_progress=not quiet, fail_on_failures=False)
        if not quiet:
            _summary(res)
        else:
            typer.echo(res["results_path"])
        check_failures({**res["results"], "results_path": res["results_path"]})
