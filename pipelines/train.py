"""`flywheel train`: a LoRA adapter from a mined dataset, by SFT or DPO. Unsloth on a CUDA GPU, TRL + PEFT otherwise.

    flywheel train --config configs/train/smollm2-lora.yaml dataset=out/mined max_steps=20 [--dry-run] [--resume]
    flywheel train --config configs/train/smollm2-dpo.yaml dataset=out/mined [init_adapter=models:/flywheel@champion]

The recipe, top to bottom (`run_train`):
1. validate the config (pydantic) and pick the backend: an explicit `unsloth` where it cannot run is an error;
2. resolve the base model offline (catalog -> dequantized cache) and check LoRA target modules against the
   architecture on the meta device, all before any weights load;
3. load and validate the dataset (by path, or by `dataset_version` looked up in `flywheel/mine` runs);
4. tokenize exactly as the trainer will and audit it (`flywheel.training.audit` for SFT: refuse examples that
   train nothing or an end-of-turn token that is never trained; `flywheel.training.dpo` for pairs: refuse when
   most pairs are identical or truncated away). `--dry-run` stops here, printing the audit;
5. train with per-step metrics batched into MLflow by a callback, eval every `eval_every` steps and
   checkpoints every `save_every` (`--resume` continues from the newest complete one); SFT can run as DDP ranks;
6. save the adapter atomically with `flywheel_adapter.json` (method, base model name + weight hash, dataset
   version, run ids, chat template, eos tokens; for DPO beta and the reference) and log it with the audit,
   resolved config and a base-vs-adapter generations table.

The phases themselves are plain functions in the training core (`flywheel.training.recipe`; torchrun in
`flywheel.training.launch`, the `--resume` state in `flywheel.training.checkpoints`); this module adds the MLflow
run and lookups, the callbacks that log to it, progress and the command.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import typer

from flywheel.pipelines.config import ConfigError
# The config type lives with the training core; imported here for the CLI and callers.
from flywheel.training.config import TrainConfig
from flywheel.pipelines import tags as T
from flywheel.training import checkpoints, recipe
from flywheel.training.launch import check_nproc, run_torchrun
from flywheel.training.sft import is_main_process, world_size


STAGE = "train"
DEFAULT_CONFIG = "configs/train/smollm2-lora.yaml"

# The demo's few CPU steps: a high learning rate so the loss falls visibly in 8 steps, short sequences.
DEMO_OVERRIDES: dict[str, Any] = {
    "max_steps": 8, "batch_size": 2, "grad_accum": 1, "max_length": 256, "learning_rate": 2e-3, "eval_every": 4,
    "save_every": 4, "eval_max_examples": 8, "max_train_examples": 64, "generations": 2,
    "generation_max_new_tokens": 24, "lr_scheduler": "constant",
}


def demo_config(dataset: str | Path, output_dir: str | Path, **overrides: Any) -> TrainConfig:
    """Config for `flywheel demo`: DEMO_OVERRIDES + the given dataset/output_dir + any overrides."""
    data = {**DEMO_OVERRIDES, "dataset": str(dataset), "output_dir": str(output_dir), **overrides}
    return TrainConfig.model_validate(data)


def run_train(cfg: TrainConfig, dry_run: bool = False, resume: bool = False, *,
              callbacks: Sequence[Any] = (), progress: bool = False) -> dict:
    """Train (or audit, with dry_run) and log to MLflow `flywheel/train`.

    Returns {run_id, adapter_dir, audit, first_loss, final_loss, global_step, losses, eval_losses,
    resumed_from, base_model, dataset_version, mine_run_id, generations, backend, device, method}; with dry_run:
    {dry_run: True, audit, example, ...} and no run. Raises ConfigError/InputError on bad config, data or audit.
    `callbacks`: extra transformers TrainerCallbacks (tests use one to interrupt a run).
    """
    backend, warnings = recipe.backend(cfg)                            # 1.
    ds, mine_run_id = _dataset(cfg)  # 2. first: a re-mined dataset version fails before any weights resolve
    info = recipe.base_model(cfg)                                      # 3.
    prep = _prepare(cfg, info, ds, mine_run_id)                        # 4.
    base = {"audit": prep.report, "example": prep.example, "base_model": info.to_dict(),
            "dataset_version": ds.version, "dataset_path": str(ds.path), "mine_run_id": mine_run_id,
            "backend": backend.name, "device": backend.device, "warnings": warnings, "method": cfg.method}
    if dry_run:
        return {"dry_run": True, **base}
    recipe.check_report(cfg.method, prep.report)
    launch = cfg.nproc > 1 and world_size() == 1
    if launch:
        check_nproc(cfg.nproc, backend.device)
    out_dir = Path(cfg.output_dir)
    ckpt = checkpoints.resume_checkpoint(out_dir) if resume else None
    with _train_run(cfg, ds.version, mine_run_id, _tags(cfg, info, backend, launch, ckpt), prep.report, ckpt,
                    out_dir) as run_id:
        if launch:                                                     # 5. as DDP ranks
            return {**base, **launch_ranks(cfg, run_id, resume=resume, progress=progress)}
        trainer, stats = _fit(cfg, backend, prep, callbacks, progress, resume)  # 5. here
        if trainer.state.global_step < (trainer.state.max_steps or 0):
            # Stopped early by a callback (control.should_training_stop): leave checkpoints for --resume, no adapter.
            _set_status("interrupted")
            return {"run_id": run_id, "adapter_dir": None, "interrupted": True, **base, **stats}
        if not is_main_process():  # the other ranks are done: rank 0 alone writes the adapter and the run's artifacts
            return {"run_id": run_id, "adapter_dir": None, **base, **stats}
        adapter_dir = _save_adapter(cfg, trainer, prep, run_id, stats)  # 6.
        gens = _log_outputs(cfg, trainer, prep, adapter_dir, stats)
    return {"run_id": run_id, "adapter_dir": str(adapter_dir.resolve()), "generations": gens, **base, **stats}


# -- the phases ----------------------------------------------------------------------------------------------

def _dataset(cfg: TrainConfig) -> tuple[Any, str | None]:
    """The dataset the method reads (conversations or preference pairs) and the mine run that made it."""
    dataset_path, mine_run_id = resolve_dataset(cfg)
    ds = recipe.load_dataset(cfg, dataset_path)
    if mine_run_id is None:
        mine_run_id = find_mine_run(ds.version, cfg.tracking_uri)
    return ds, mine_run_id


def _prepare(cfg: TrainConfig, info: Any, ds: Any, mine_run_id: str | None) -> recipe.Prepared:
    """Tokenize exactly as the trainer will and audit; DPO first resolves the adapter it starts from."""
    if cfg.method == "dpo":
        return recipe.prepare_dpo(cfg, info, ds, mine_run_id, _init_adapter(cfg, info))
    return recipe.prepare_sft(cfg, info, ds, mine_run_id)


def _init_adapter(cfg: TrainConfig, info: Any) -> dict | None:
    """Resolve `init_adapter` (path, runs:/..., models:/...) and refuse one trained on another base."""
    if not cfg.init_adapter:
        return None
    from flywheel.pipelines import tracking
    from flywheel.pipelines.registry import resolve_model

    if cfg.init_adapter.startswith(("runs:/", "models:/")):
        tracking.setup(cfg.tracking_uri)
    m = resolve_model(cfg.init_adapter, "init_adapter")
    recipe.check_init_adapter(cfg.init_adapter, m.meta, info)
    return {"uri": m.uri, "dir": str(m.adapter_dir), "run_id": m.run_id}


def _tags(cfg: TrainConfig, info: Any, backend: Any, launch: bool, ckpt: Path | None) -> dict:
    return {T.BASE_MODEL: info.name, T.BASE_MODEL_SHA256: info.sha256,
            T.BACKEND: backend.name, T.DEVICE: backend.device, T.TRAIN_METHOD: cfg.method,
            T.TRAIN_NPROC: max(cfg.nproc if launch else 1, world_size()),
            T.TRAIN_RESUMED_FROM_CHECKPOINT: ckpt.name if ckpt else None}


def _fit(cfg: TrainConfig, backend: Any, prep: recipe.Prepared, callbacks: Sequence[Any], progress: bool,
         resume: bool) -> tuple[Any, dict]:
    """Run the method's trainer; rank 0 alone reports to MLflow and the terminal."""
    cbs = ([MlflowStepCallback()] + ([RichProgressCallback()] if progress else [])) if is_main_process() else []
    return recipe.fit(cfg, backend, prep, cbs + list(callbacks), resume)


def _save_adapter(cfg: TrainConfig, trainer: Any, prep: recipe.Prepared, run_id: str | None, stats: dict) -> Path:
    """Adapter + lineage file, atomically, then into the run's artifacts."""
    import mlflow

    from flywheel.training.lineage import adapter_lineage, write_adapter

    lineage = adapter_lineage(prep.info, dataset_version=prep.dataset.version, mine_run_id=prep.mine_run_id,
                              train_run_id=run_id, chat_template=prep.inference_template, tokenizer=prep.tokenizer,
                              lora=cfg.lora.model_dump(), global_step=stats["global_step"], method=cfg.method,
                              **prep.lineage)
    adapter_dir = write_adapter(trainer.model, prep.tokenizer, Path(cfg.output_dir) / "adapter",
                                prep.inference_template, lineage)
    mlflow.log_artifacts(str(adapter_dir), "adapter")
    return adapter_dir


def _log_outputs(cfg: TrainConfig, trainer: Any, prep: recipe.Prepared, adapter_dir: Path, stats: dict) -> list[dict]:
    """The base-vs-adapter generations table and the run's summary metrics; marks the run finished."""
    import mlflow

    from flywheel.pipelines import tracking
    from flywheel.training.sft import generation_table

    gens: list[dict] = []
    conversations = prep.dataset.eval_conversations() if cfg.method == "dpo" else prep.dataset.eval
    if cfg.generations and conversations:
        gens = generation_table(trainer.model, prep.tokenizer, conversations, cfg.generations,
                                cfg.generation_max_new_tokens)
        import pandas as pd

        mlflow.log_table(pd.DataFrame(gens), artifact_file="generations.json")
    summary = {k: stats[k] for k in ("first_loss", "final_loss", "train_loss", "global_step")}
    if stats["eval_losses"]:
        summary["final_eval_loss"] = stats["eval_losses"][-1][1]
    tracking.log_metrics(summary)
    _set_status("finished")
    return gens


def _set_status(status: str) -> None:
    if is_main_process():
        import mlflow

        mlflow.set_tag(T.TRAIN_STATUS, status)


# -- the run and the ranks ---------------------------------------------------------------------------------

# `flywheel train --nproc N` opens the MLflow run in the parent and hands its id to rank 0 through the
# environment, so a DDP job is one run however many processes train; other ranks never touch MLflow.
RUN_ID_ENV = "FLYWHEEL_TRAIN_RUN_ID"
RESULT_ENV = "FLYWHEEL_TRAIN_RESULT"      # where rank 0 writes its result dict for the parent
# TRL's DPO metrics (train and eval_): reward accuracy/margins/chosen/rejected and the policy's log-probs
DPO_METRICS = ("rewards/", "eval_rewards/", "logps/", "eval_logps/")


@contextlib.contextmanager
def _train_run(cfg: TrainConfig, dataset_version: str, mine_run_id: str | None, tags: dict, report: dict,
               ckpt: Path | None, out_dir: Path) -> Iterator[str | None]:
    """The MLflow run this training logs into; yields its id (None on a rank > 0 of a self-launched job)."""
    import os

    attach = os.environ.get(RUN_ID_ENV)
    if not is_main_process():
        yield attach
        return
    import mlflow

    from flywheel.pipelines import tracking
    from flywheel.pipelines.config import flatten

    if attach:  # rank 0 under `flywheel train --nproc N`: the parent opened the run and logged the audit
        tracking.setup(cfg.tracking_uri)
        with mlflow.start_run(run_id=attach):
            yield attach
        return
    previous = checkpoints.read_state(out_dir) if ckpt else {}
    tags = {**tags, T.TRAIN_RESUMED_FROM_RUN: previous.get("run_id")}
    with tracking.start_run(STAGE, cfg.run_name, inputs={T.IN_DATASET_VERSION: dataset_version, T.IN_MINE_RUN: mine_run_id},
                            tags=tags, params=flatten(cfg.model_dump()), configured_uri=cfg.tracking_uri) as run:
        run_id = run.info.run_id
        if previous.get("run_id"):
            _close_killed_run(previous["run_id"])
        checkpoints.write_state(out_dir, {"run_id": run_id, "config": cfg.model_dump()})
        mlflow.log_dict(report, "audit.json")
        mlflow.log_text(_config_yaml(cfg), "config.yaml")
        yield run_id


def launch_ranks(cfg: TrainConfig, run_id: str, *, resume: bool, progress: bool) -> dict:
    """Run the recipe as `cfg.nproc` DDP ranks under torchrun (`flywheel.training.launch`); return rank 0's result."""
    import os
    import tempfile

    from flywheel.pipelines import tracking
    from flywheel.foundation.errors import FlywheelError

    with tempfile.TemporaryDirectory(prefix="flywheel-ddp-") as tmp:
        cfg_path, result_path = Path(tmp) / "config.yaml", Path(tmp) / "result.json"
        cfg_path.write_text(_config_yaml(cfg), encoding="utf-8")
        env = {**os.environ, RUN_ID_ENV: run_id, RESULT_ENV: str(result_path),
               "MLFLOW_TRACKING_URI": tracking.tracking_uri(cfg.tracking_uri)}
        args = ["--config", str(cfg_path)] + (["--resume"] if resume else []) + (["--progress"] if progress else [])
        rc = run_torchrun(cfg.nproc, "flywheel.pipelines.train_worker", args, env)
        if rc != 0:
            raise FlywheelError(f"train: a rank failed under torchrun (exit code {rc}, its error is above); the "
                                f"other ranks were stopped and no adapter was written; checkpoints in "
                                f"{Path(cfg.output_dir) / 'checkpoints'} continue with --resume")
        if not result_path.exists():
            raise FlywheelError("train: torchrun exited 0 but rank 0 reported no result")
        return json.loads(result_path.read_text(encoding="utf-8"))


# -- dataset lookup ------------------------------------------------------------------------------------------

def resolve_dataset(cfg: TrainConfig) -> tuple[str, str | None]:
    """(dataset path, mine run id if known). By path, or by version via the `flywheel.dataset_version` tag."""
    from flywheel.foundation.errors import InputError

    if cfg.dataset:
        if Path(cfg.dataset).is_dir():  # a single file has no manifest: its content hash is checked after loading
            recipe.check_dataset_version(cfg.dataset, recipe.manifest_version(cfg.dataset), cfg.dataset_version)
        return cfg.dataset, None
    if not cfg.dataset_version:
        raise ConfigError("dataset: give `dataset=<flywheel mine output dir>` or `dataset_version=<version>`")
    run = _mine_run_for_version(cfg.dataset_version, cfg.tracking_uri)
    if run is None:
        raise InputError(f"dataset_version: no run in flywheel/mine has flywheel.dataset_version="
                         f"{cfg.dataset_version!r}")
    path = run.data.tags.get(T.DATASET_PATH)
    if not path:
        raise InputError(f"dataset_version: mine run {run.info.run_id} has no flywheel.dataset_path tag")
    recipe.check_dataset_version(path, recipe.manifest_version(path), cfg.dataset_version)
    return path, run.info.run_id


def find_mine_run(version: str, tracking_uri: str | None = None) -> str | None:
    run = _mine_run_for_version(version, tracking_uri)
    return run.info.run_id if run else None


def _mine_run_for_version(version: str, tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    from flywheel.pipelines import tracking

    tracking.setup(tracking_uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name("flywheel/mine")
    if exp is None:
        return None
    safe = version.replace("'", "")
    # Only finished runs: a failed or still running mine has no complete dataset behind its tags.
    runs = client.search_runs([exp.experiment_id],
                              f"tags.`flywheel.dataset_version` = '{safe}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


# -- callbacks -----------------------------------------------------------------------------------------------

def _make_callbacks():
    """Define the TrainerCallbacks lazily: transformers is too heavy for module import time."""
    from transformers import TrainerCallback

    from flywheel.pipelines import tracking

    class _Mlflow(TrainerCallback):
        """One batched `log_metrics` call per logging step: loss, lr, grad norm, tokens/s (and eval loss)."""

        def __init__(self):
            self.step_time = 0.0
            self.t0 = None
            self.tokens_at_last_log = 0

        def on_train_begin(self, args, state, control, **kw):
            self.tokens_at_last_log = int(getattr(state, "num_input_tokens_seen", 0) or 0)

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.t0 is not None:
                self.step_time += time.perf_counter() - self.t0
                self.t0 = None

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            metrics = {k: v for k, v in logs.items() if k in ("loss", "eval_loss", "learning_rate", "grad_norm") or
                       k.startswith(DPO_METRICS)}
            if "loss" in logs:
                seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
                if self.step_time > 0 and seen > self.tokens_at_last_log:
                    metrics["tokens_per_s"] = (seen - self.tokens_at_last_log) / self.step_time
                self.tokens_at_last_log, self.step_time = seen, 0.0
            if metrics:
                tracking.log_metrics(metrics, step=state.global_step)

    class _Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                              TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.p.start()
            self.task = self.p.add_task("train", total=state.max_steps, completed=state.global_step, info="")

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            info = " ".join(f"{k}={logs[k]:.4g}" for k in ("loss", "eval_loss") if k in logs)
            if info:
                self.p.update(self.task, info=info)

        def on_step_end(self, args, state, control, **kw):
            self.p.update(self.task, completed=state.global_step)

        def on_train_end(self, args, state, control, **kw):
            self.p.stop()

    return _Mlflow, _Progress


def MlflowStepCallback():  # noqa: N802 - reads like the class it builds
    return _make_callbacks()[0]()


def RichProgressCallback():  # noqa: N802
    return _make_callbacks()[1]()


# -- small helpers -------------------------------------------------------------------------------------------

def _config_yaml(cfg: TrainConfig) -> str:
    import yaml

    return "# flywheel train --config <this file>\n" + yaml.safe_dump(cfg.model_dump(), sort_keys=False)


def _close_killed_run(run_id: str) -> None:
    """A kill -9 leaves its MLflow run RUNNING forever; the resumed run marks it KILLED (and links to it by tag)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
    except Exception:  # noqa: BLE001 - the old run may live in another store; lineage tag is still set
        pass


# -- CLI -----------------------------------------------------------------------------------------------------

def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. dataset=out/mined lora.r=16"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help=f"YAML config (e.g. {DEFAULT_CONFIG})"),
        dry_run: bool = typer.Option(False, "--dry-run", help="tokenize, print the loss-mask audit and one "
                                     "example with masked tokens in [[ ]], then stop"),
        resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in output_dir"),
        nproc: Optional[int] = typer.Option(None, "--nproc", help="DDP processes on this machine (torchrun); "
                                            "same as nproc=N"),
    ) -> None:
        """Train a LoRA adapter on a mined dataset (Unsloth on GPU, TRL+PEFT otherwise)."""
        from flywheel.pipelines.config import load_config

        cfg = load_config(TrainConfig, config, (overrides or []) + ([f"nproc={nproc}"] if nproc else []))
        result = run_train(cfg, dry_run=dry_run, resume=resume, progress=not dry_run)
        _print_summary(result)
        if dry_run and not result["audit"]["ok"]:
            recipe.check_report(cfg.method, result["audit"])


SFT_AUDIT_ROWS = ("template", "examples", "examples_used", "tokens_total", "tokens_trained", "trained_fraction",
                  "trained_per_example", "zero_trained_examples", "eot_token", "eot_trained",
                  "examples_with_eot_trained", "truncated", "dropped_overlong", "dropped_truncated_to_nothing")
DPO_AUDIT_ROWS = ("pairs", "eval_pairs", "eval_source", "identical_pairs", "prompts_cut_to_nothing", "chosen_empty",
                  "rejected_empty", "prompt_truncated", "chosen_truncated", "rejected_truncated")


def _print_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    a = result["audit"]
    dpo = result.get("method") == "dpo"
    t = Table(title="pair audit" if dpo else "loss-mask audit", show_header=False)
    for k in DPO_AUDIT_ROWS if dpo else SFT_AUDIT_ROWS:
        t.add_row(k, str(a.get(k)))
    for part, dist in (a.get("lengths") or {}).items():
        t.add_row(f"{part} tokens", " ".join(f"{k}={v}" for k, v in dist.items()))
    t.add_row("verdict", "[green]ok[/]" if a["ok"] else "[red]" + "; ".join(a["problems"]) + "[/]")
    con.print(t)
    con.print(f"{result.get('method', 'sft')}: base model {result['base_model']['name']} "
              f"({result['base_model']['sha256'][:12]}), dataset "
              f"{result['dataset_version']}, backend {result['backend']} on {result['device']}")
    for w in result.get("warnings") or []:
        con.print(f"[yellow]warning:[/] {w}")
    if result.get("dry_run"):
        con.print("first pair:" if dpo else "example (masked, untrained tokens in [[ ]]):", style="bold")
        con.print(result["example"], markup=False, highlight=False)
        return
    if result.get("adapter_dir"):
        con.print(f"loss {result['first_loss']:.4f} -> {result['final_loss']:.4f} in {result['global_step']} "
                  f"steps; adapter {result['adapter_dir']}; MLflow run {result['run_id']}")
    for r in result.get("eval_rewards") or []:
        con.print(f"step {r['step']}: eval reward accuracy {r['accuracy']:.3f}, margin {r['margin']:.4f}")
