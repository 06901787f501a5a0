"""`flywheel mine`: rated chat logs -> a versioned dataset dir (SFT + preferences), tracked in MLflow.

    flywheel mine ../shared/data/oasst1-en-validation --out data/oasst1 [--config configs/mine.yaml] [k=v ...]

The recipe: load the config (`flywheel.mining.config.MineConfig`), mine the inputs into the dataset directory
(`flywheel.mining.engine.mine_to_dir`: parse -> curate -> redact -> dedupe -> split -> manifest + card, written
atomically) with progress bars, then log an MLflow run in `flywheel/mine`: params, counts (one batched call), the
dataset as an `mlflow.data` input, manifest/card/samples as artifacts.

Python entry for `flywheel demo` / `flywheel run`: `run_mine(inputs, out, cfg) -> dict`. An empty input file (a
rotated log) is counted (0 records, `"empty": true` in the manifest) and named in the result's `warnings`; only a
run whose inputs are all empty is an error.
"""

from __future__ import annotations

from pathlib import Path

import typer

from flywheel.mining.config import RUNTIME_KEYS, DedupeConfig, MineConfig, PreferenceConfig, usable_cpus
from flywheel.mining.dedupe import DedupeIndex
from flywheel.mining.engine import Mined, mine
from flywheel.foundation.errors import InputError
from flywheel.pipelines.config import load_config, split_args
from flywheel.pipelines import tags as T

__all__ = ["RUNTIME_KEYS", "DedupeConfig", "MineConfig", "PreferenceConfig", "usable_cpus", "mine_to_dir",
           "run_mine", "input_warnings", "register"]


class _Bars:
    """The engine's progress callback drawn as rich progress bars, one per task."""

    def __init__(self, bar):
        self.bar = bar
        self.ids: dict[str, int] = {}

    def __call__(self, task: str, done: int, total: int) -> None:
        if task not in self.ids:
            self.ids[task] = self.bar.add_task(task, total=total)
        self.bar.update(self.ids[task], completed=done)


def _progress(enabled: bool):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=False)


def mine_to_dir(inputs: list[str | Path], out: str | Path, cfg: MineConfig, force: bool = False) -> dict:
    """Write the dataset dir (no MLflow) with progress bars when `cfg.progress`; return the manifest."""
    return _mine(inputs, out, cfg, force).manifest


def _mine(inputs: list[str | Path], out: str | Path, cfg: MineConfig, force: bool,
          prior_index: DedupeIndex | None = None) -> Mined:
    from flywheel.pipelines.traces import resolve_inputs

    inputs = resolve_inputs(inputs, cfg)  # `mlflow-traces:<experiment>` -> traces read from the tracking server
    run = mine
    if cfg.engine == "ray":
        from flywheel.mining.engine import StreamInput
        from flywheel.mining.ray_engine import mine as run

        if any(isinstance(i, StreamInput) for i in inputs):
            raise InputError("engine=ray reads files only; mine mlflow-traces: inputs with engine=local")
    with _progress(cfg.progress) as bar:
        return run(inputs, out, cfg, force=force, progress=_Bars(bar) if cfg.progress else None, prior=prior_index)


def run_mine(inputs: list[str | Path], out: str | Path, cfg: MineConfig | None = None, force: bool = False,
             prior_index: DedupeIndex | None = None) -> dict:
    """Mine `inputs` into `out` and log the run to MLflow (`flywheel/mine`).

    `prior_index`: what earlier batches kept (the loop's), dropped here as `duplicate_earlier_batch`.
    Returns {"run_id" (None when cfg.log_mlflow is false), "out" (absolute path), "manifest" (dict),
    "version", "counts", "splits", "warnings", "index" (the prior index plus what this run kept)}.
    """
    cfg = cfg or MineConfig()
    mined = _mine(inputs, out, cfg, force, prior_index)
    manifest = mined.manifest
    out = Path(out).resolve()
    run_id = _log_run(out, manifest, cfg, mined.stats) if cfg.log_mlflow else None
    return {"run_id": run_id, "out": str(out), "manifest": manifest, "version": manifest["version"],
            "counts": manifest["counts"], "splits": manifest["splits"], "warnings": input_warnings(manifest),
            "index": mined.index}


def input_warnings(manifest: dict) -> list[str]:
    return [f"{i['path']}: empty input file (0 records)" for i in manifest["inputs"] if i.get("empty")]


def _log_run(out: Path, manifest: dict, cfg: MineConfig, stats: dict | None = None) -> str:
    import warnings

    import mlflow
    from mlflow.data.meta_dataset import MetaDataset

    from flywheel.pipelines import tracking
    from flywheel.pipelines.config import flatten

    c = manifest["counts"]
    metrics: dict[str, float] = {"read": c["read"], "kept": c["kept"], "rejected": c["rejected"],
                                 "split.train": manifest["splits"]["train"],
                                 "split.eval": manifest["splits"]["eval"], "preferences": c["preferences"],
                                 "split.preferences": manifest["splits"].get("preferences", 0),
                                 "split.preferences_eval": manifest["splits"].get("preferences_eval", 0)}
    metrics.update({f"filtered.{k}": v for k, v in c["filtered"].items()})
    metrics.update({f"pii.{k}": v for k, v in c["pii"].items()})
    tags = {T.DATASET_VERSION: manifest["version"], T.DATASET_PATH: str(out)}
    inputs = {T.IN_LOGS: ",".join(i["path"] for i in manifest["inputs"]),
              T.IN_LOGS_SHA256: ",".join(i["sha256"][:16] for i in manifest["inputs"])}
    params = flatten({k: v for k, v in cfg.model_dump().items() if k not in ("progress",)})
    params.update((stats or {}).get("params", {}))  # the Ray engine: its cluster's size; peak RSS as metrics
    metrics.update((stats or {}).get("metrics", {}))
    with tracking.start_run("mine", run_name=f"mine-{manifest['version']}", inputs=inputs, tags=tags,
                            params=params, configured_uri=cfg.tracking_uri) as run:
        tracking.log_metrics(metrics)
        with warnings.catch_warnings():  # "source can be interpreted in multiple ways": it is a local dir
            warnings.simplefilter("ignore")
            from mlflow.data.dataset_source_registry import resolve_dataset_source

            ds = MetaDataset(source=resolve_dataset_source(str(out)), name=f"flywheel-mine-{manifest['version']}",
                             digest=manifest["version"])
            mlflow.log_input(ds, context="training")
        for name in ("manifest.json", "README.md", "samples.jsonl"):
            mlflow.log_artifact(str(out / name))
        return run.info.run_id


# ------------------------------------------------------------------------------------------------ the CLI
def register(app: typer.Typer) -> None:
    @app.command("mine")
    def mine(
        args: list[str] = typer.Argument(..., metavar="INPUT... [KEY=VALUE...]",
                                         help="log files or directories (JSONL/CSV/Parquet, oasst, hh) or "
                                              "mlflow-traces:<experiment>, then "
                                              "key=value config overrides, e.g. min_rating=5"),
        out: Path = typer.Option(..., "--out", "-o", help="dataset directory to write (a new or empty one, or an earlier Flywheel output)"),
        config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (configs/mine.yaml)"),
        force: bool = typer.Option(False, "--force", help="replace an existing --out directory Flywheel did not write"),
    ) -> None:
        """Rated chat logs -> versioned SFT + preference JSONL, tracked in MLflow (`flywheel/mine`)."""
        # One variadic argument holds both: an argument with '=' is an override unless it names an existing path.
        paths, extra = split_args(args)
        if not paths:
            raise typer.BadParameter("give at least one INPUT file or directory")
        cfg = load_config(MineConfig, config, extra)
        res = run_mine(paths, out, cfg, force=force)
        c = res["counts"]
        for w in res["warnings"]:
            typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
        typer.echo(f"dataset {res['version']} -> {res['out']}")
        typer.echo(f"read {c['read']} = kept {c['kept']} + rejected {c['rejected']} + filtered "
                   f"{sum(c['filtered'].values())} {dict(c['filtered'])}")
        typer.echo(f"train {res['splits']['train']}  eval {res['splits']['eval']}  preferences {c['preferences']} "
                   f"(train {res['splits']['preferences']}, eval {res['splits']['preferences_eval']})"
                   f"  pii {dict(c['pii'])}")
        if res["run_id"]:
            typer.echo(f"mlflow run {res['run_id']} (experiment flywheel/mine)")

