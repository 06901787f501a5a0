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
   (params variant/target/prompt_version, metrics = cell means, `cases.json` table); with `log_traces`, each
   generation as a trace with its scores as assessments (`flywheel.pipelines.eval_traces`).

Python entry: `run_eval(cfg: EvalConfig) -> {"run_id", "results_path", "results", "out"}`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from flywheel.evals.prompts.config import DEFAULT_BASE, EvalConfig, TargetSpec
from flywheel.evals.prompts import suite
from flywheel.pipelines.config import load_config
from flywheel.foundation.errors import InputError
from flywheel.pipelines import tags as T

ROOT = Path(__file__).resolve().parents[1]


# -- resolution (before any generation) -----------------------------------------------------------------------

def _fetch_adapter(spec: str, target: str, scratch: Path) -> tuple[Path, dict[str, str]]:
    """A local dir as is; an MLflow URI downloaded (mlflow resolves `models:/name@alias` to its source)."""
    if not suite.is_uri(spec):
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
                                          options=suite.endpoint_options(cfg, spec.extra_body), revision=spec.revision))
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


def _register_prompts(cfg: EvalConfig, plan: suite.Plan, run_id: str) -> dict[str, Any]:
    """Each variant in the prompt registry, linked to the parent run. -> {variant name: prompt version}."""
    from mlflow.tracking import MlflowClient

    prompt_versions = {}
    if cfg.register_prompts:
        for v in plan.variants:
            pv = register_prompt(v)
            MlflowClient().link_prompt_version_to_run(run_id, pv)
            prompt_versions[v.name] = pv
    return prompt_versions


def _generate(cfg: EvalConfig, plan: suite.Plan, targets: list[Any], show_progress: bool) -> dict:
    """Phase 2: the matrix, under a progress bar. -> harness.run_matrix's {rows, notes}."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flywheel.evals.prompts import harness

    g = cfg.generation
    embedder = suite.LazyEmbedder(cfg.embedding_model) if "embedding_similarity" in plan.metrics else None
    total = len(targets) * len(plan.variants) * len(plan.caseset.cases) * g.repeat
    with Progress(TextColumn("[bold]eval[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=not show_progress, transient=True) as bar:
        task = bar.add_task("generate", total=total)
        return harness.run_matrix(
            plan.caseset.cases, plan.variants, targets, params=plan.params, cache=plan.cache, metrics=plan.metrics,
            suite_assertions=cfg.assertions, repeat=g.repeat, embedder=embedder, judge=plan.judge,
            nll_batch_size=cfg.nll_batch_size, nll_max_length=cfg.nll_max_length,
            progress=_progress(bar, task, show_progress))


def _log_cells(plan: suite.Plan, targets: list[Any], rows: list[dict], cells: list[dict], prompt_versions: dict,
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
                mlflow.log_table(suite.cells_table(cell_rows), artifact_file="cases.json")
                child_runs[f"{t.name}/{v.name}"] = child.info.run_id
    return child_runs


def _results(cfg: EvalConfig, plan: suite.Plan, run_id: str, targets: list[Any], matrix: dict,
             prompt_versions: dict, inputs: dict) -> dict:
    """Cells, comparisons and child runs -> the results.json dict."""
    rows = matrix["rows"]
    cells, comparisons, notes = suite.cells_and_comparisons(cfg, plan, rows, [t.name for t in targets])
    child_runs = _log_cells(plan, targets, rows, cells, prompt_versions, inputs)
    return suite.results(cfg, plan, run_id=run_id, targets=targets, rows=rows, cells=cells, comparisons=comparisons,
                         notes=matrix["notes"] + notes, child_runs=child_runs,
                         prompt_uris={name: pv.uri for name, pv in prompt_versions.items()})


def _write(cfg: EvalConfig, plan: suite.Plan, results: dict, rows: list[dict]) -> None:
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
    plan = suite.plan(cfg)
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
            if cfg.log_traces:
                from flywheel.pipelines.eval_traces import log_generation_traces

                log_generation_traces(matrix["rows"], parent.info.run_id, parent.info.experiment_id, cfg.judge.model)
    res = {"run_id": results["run_id"], "results_path": str(plan.out_dir / "results.json"), "results": results,
           "out": str(plan.out_dir)}
    if fail_on_failures:
        suite.check_failures({**results, "results_path": res["results_path"]})
    return res


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
        suite.check_failures({**res["results"], "results_path": res["results_path"]})
