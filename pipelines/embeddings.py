"""`flywheel bench-embeddings`: embedding models x tasks, quality and speed, with significance. A recipe.

    flywheel bench-embeddings --config configs/embeddings.yaml [models=[static-64,all-MiniLM-L6-v2] max_docs=300]

What it does, top to bottom (`run_bench_embeddings`; the computation is `flywheel.evals.embeddings.bench`,
the files `flywheel.evals.embeddings.report`, the settings `flywheel.evals.embeddings.config`):
1. load and validate every task first (BEIR retrieval, STS pairs, a mined dataset), so bad input fails before
   minutes of encoding; resolve every model (offline; preparing catalog models once into the cache);
2. per model x task: embeddings through the on-disk cache (model identity + text hash), exact cosine ranking,
   per-query metrics (retrieval) or per-pair cosines (STS + duplicate-threshold calibration), and a speed probe
   (warm-up apart; cached with the vectors, `speed.refresh=true` re-measures). A model is loaded only when
   something is not cached, which is what makes a warm rerun >= 10x faster with identical numbers;
3. per task: paired comparisons of all model pairs (bootstrap CI, Wilcoxon/permutation, Holm);
4. write `out/` atomically: leaderboard.csv/.md, comparisons.csv, calibration.csv, per_query/*.csv,
   quality_vs_speed.png, summary.json;
5. MLflow (`flywheel/embeddings`): a parent run with the config, the leaderboard and the plot, and a child run per
   model x task (params model/task/dims/size_mb; metrics; per_query.csv).

Features and trade-offs:
- Retrieval is exhaustive cosine: exact, fine for corpora of thousands; an ANN index would blur the comparison.
- `max_docs` keeps every relevant document of the kept queries, so a subsampled corpus is easier, never wrong:
  compare models on the same settings only (the settings are in the run's params).
- Speed numbers are measured once per model x task (key: model identity, the sampled texts, batch size) and then
  cached like the vectors: a warm run reports the cold run's measurement (child param `speed_cached`;
  `speed.refresh=true` or `cache=false` measures again). Compare speed across models measured on one machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

# The settings, columns and file names live in the core; imported here for the stage's callers (demo, dashboard).
from flywheel.evals.embeddings.bench import COLUMNS, PRIMARY  # noqa: F401
from flywheel.evals.embeddings.config import DEFAULT_DATA_DIR, EmbeddingsConfig, demo_config  # noqa: F401
from flywheel.evals.embeddings.report import fmt, per_query_name
from flywheel.pipelines.config import flatten, load_config
from flywheel.pipelines import tags as T


def run_bench_embeddings(cfg: EmbeddingsConfig | None = None, *, quiet: bool = False) -> dict:
    """Run the benchmark. Returns {`run_id`, `out` (Path), `leaderboard` (rows as dicts, COLUMNS keys),
    `comparisons` (rows), `elapsed_s`}."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from flywheel.evals.embeddings import bench, report
    from flywheel.foundation.io import atomic_dir, check_output_dir

    cfg = cfg or EmbeddingsConfig()
    t_start = time.perf_counter()
    # 1. Everything validated before any encoding; the output directory checked now, not after the benchmark.
    inputs = bench.resolve_inputs(cfg)
    check_output_dir(cfg.out, inputs=inputs.paths, force=cfg.force)
    tasks = inputs.tasks
    # 2. Model x task.
    with _progress(quiet) as progress:
        bar = progress.add_task("bench-embeddings", total=len(inputs.models) * len(tasks))

        def on_step(desc: str, done: bool) -> None:
            progress.advance(bar) if done else progress.update(bar, description=desc)

        results = bench.run_matrix(cfg, inputs, on_step)
    # 3. Statistics per task, 4. outputs, 5. tracking.
    comparisons = bench.compare_all(results, tasks, cfg)
    leaderboard = bench.leaderboard(results, comparisons, tasks)
    out = Path(cfg.out)
    with atomic_dir(out, force=cfg.force, inputs=inputs.paths, stage="embeddings") as tmp:
        report.write_outputs(tmp, cfg, results, leaderboard, comparisons, tasks)
    run_id = _track(cfg, out, results, tasks, leaderboard)
    elapsed = time.perf_counter() - t_start
    if not quiet:
        _print_leaderboard(leaderboard, out, run_id, elapsed)
    return {"run_id": run_id, "out": out, "leaderboard": leaderboard, "comparisons": comparisons,
            "elapsed_s": elapsed}


def _track(cfg: EmbeddingsConfig, out: Path, results: list[dict], tasks, leaderboard) -> str:
    import shutil
    import tempfile

    import mlflow

    from flywheel.pipelines import tracking

    inputs = {}
    versions = sorted({t.info["dataset_version"] for t in tasks if t.info.get("dataset_version")})
    if versions:
        inputs[T.IN_DATASET_VERSION] = ",".join(versions)
    with tracking.start_run("embeddings", cfg.run_name, inputs=inputs, configured_uri=cfg.tracking_uri,
                            params=flatten(cfg.model_dump()), tags={T.EMBEDDINGS_TASKS: ",".join(
                                t.name for t in tasks)}) as parent:
        for name in ("leaderboard.csv", "leaderboard.md", "comparisons.csv", "quality_vs_speed.png", "summary.json",
                     "calibration.csv"):
            if (out / name).exists():
                mlflow.log_artifact(str(out / name))
        for r in results:
            task = next(t for t in tasks if t.name == r["task"])
            with tracking.start_run("embeddings", f"{r['model']} x {r['task']}", nested=True, params={
                    "model": r["model"], "task": r["task"], "kind": r["kind"], "dims": r["dims"],
                    "size_mb": r["size_mb"], "n": r["n"], "speed_cached": r["speed_cached"],
                    "encoded": r["encoded"], "cached": r["cached"], "task_source": task.source},
                    inputs={T.IN_DATASET_VERSION: task.info.get("dataset_version")}):
                row = next(x for x in leaderboard if x["model"] == r["model"] and x["task"] == r["task"])
                tracking.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float))
                                      and not isinstance(v, bool)})
                mlflow.set_tag(T.EMBEDDINGS_VS_BEST, row["vs_best"])
                # The contract names the child's artifact per_query.csv.
                with tempfile.TemporaryDirectory() as d:
                    shutil.copy(out / "per_query" / per_query_name(r), Path(d) / "per_query.csv")
                    mlflow.log_artifact(str(Path(d) / "per_query.csv"))
        return parent.info.run_id


def _progress(quiet: bool):
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if quiet:
        class _Null:
            def add_task(self, *a, **k):
                return 0

            def update(self, *a, **k):
                pass

            def advance(self, *a, **k):
                pass
        return contextlib.nullcontext(_Null())
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)


def _print_leaderboard(rows: list[dict], out: Path, run_id: str, elapsed: float) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = ["model", "task", "ndcg@10", "mrr@10", "recall@10", "spearman", "texts_per_s", "latency_p50_ms", "dims",
            "vs_best"]
    table = Table(title="embedding leaderboard")
    for c in cols:
        table.add_column(c, justify="left" if c in ("model", "task", "vs_best") else "right")
    for r in rows:
        table.add_row(*[fmt(r.get(c), 1 if c in ("texts_per_s", "latency_p50_ms") else 3) for c in cols])
    console = Console()
    if not console.is_terminal:  # piped into a log: do not squeeze the table to 80 columns
        console = Console(width=160)
    console.print(table)
    console.print(f"{out}/leaderboard.csv  (mlflow run {run_id}, experiment flywheel/embeddings)  {elapsed:.1f}s")


# ------------------------------------------------------------------------------------------------ the CLI


def register(app: typer.Typer) -> None:
    @app.command("bench-embeddings")
    def bench_embeddings(
        config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (configs/embeddings.yaml)"),
        overrides: list[str] = typer.Argument(
            None, help="key=value overrides, e.g. max_docs=300 speed.refresh=true (lists: models=\\[a,b])"),
        force: bool = typer.Option(False, "--force", help="replace an existing out= directory Flywheel did not write"),
    ) -> None:
        """Embedding models x tasks: retrieval, STS, duplicate threshold, speed; leaderboard + MLflow."""
        cfg = load_config(EmbeddingsConfig, config, (overrides or []) + (["force=true"] if force else []))
        run_bench_embeddings(cfg)
