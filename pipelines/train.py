"""`flywheel train`: a LoRA adapter from a mined dataset. Unsloth on a CUDA GPU, TRL + PEFT otherwise.

    flywheel train --config configs/train/smollm2-lora.yaml dataset=out/mined max_steps=20 [--dry-run] [--resume]

The recipe, top to bottom (`run_train`):
1. validate the config (pydantic) and pick the backend: an explicit `unsloth` where it cannot run is an error;
2. resolve the base model offline (catalog -> dequantized cache) and check LoRA target modules against the
   architecture on the meta device, all before any weights load;
3. load and validate the dataset (by path, or by `dataset_version` looked up in `flywheel/mine` runs);
4. tokenize exactly as the trainer will and run the loss-mask audit (`flywheel.training.audit`): refuse to train on
   examples that train nothing or when the end-of-turn token is never trained. `--dry-run` stops here, printing
   the audit and one example with masked tokens in [[ ]];
5. train with per-step metrics batched into MLflow by a callback, eval loss every `eval_every` steps and
   checkpoints every `save_every` (`--resume` continues from the newest complete one);
6. save the adapter atomically with `flywheel_adapter.json` (base model name + weight hash, dataset version,
   run ids, chat template, eos tokens) and log it with the audit, resolved config and a base-vs-adapter
   generations table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import typer
from pydantic import Field

from flywheel.pipelines.config import ConfigError, StageConfig

STAGE = "train"
DEFAULT_CONFIG = "configs/train/smollm2-lora.yaml"


class LoraConfigSection(StageConfig):
    r: int = Field(8, gt=0, description="LoRA rank; higher = more capacity and memory")
    alpha: int = Field(16, gt=0, description="scaling = alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      min_length=1)


class TrainConfig(StageConfig):
    """Defaults train SmolLM2-135M on CPU; one config maps onto both backends."""

    # data
    dataset: Optional[str] = None              # a `flywheel mine` output dir (train.jsonl/eval.jsonl) or one .jsonl
    dataset_version: Optional[str] = None      # or: the manifest version, looked up in `flywheel/mine` runs
    max_train_examples: Optional[int] = Field(None, gt=0)
    eval_max_examples: int = Field(64, ge=0)   # eval loss on a fixed slice: cheap enough to run every interval
    max_length: int = Field(512, gt=8)
    overlong: Literal["truncate", "drop"] = "truncate"  # over-long examples: cut at max_length, or skip; counted
    packing: bool = False
    assistant_only_loss: bool = True           # train on assistant turns (+ their end-of-turn token) only
    chat_template: Optional[str] = None        # path to a jinja template with {% generation %} markers
    eot_token: Optional[str] = None            # end-of-turn token the audit requires trained; default: eos
    # model
    base_model: str = "smollm2-135m-instruct"  # catalog name, local HF dir, or hub id in the local cache
    model_cache: Optional[str] = None          # default ~/.cache/flywheel/models ($FLYWHEEL_CACHE)
    backend: Literal["auto", "unsloth", "trl"] = "auto"
    load_in_4bit: bool = False                 # QLoRA; CUDA only
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection)
    gradient_checkpointing: bool = False
    # optimisation
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: float = Field(0, ge=0)       # < 1 is a ratio of total steps
    weight_decay: float = Field(0.0, ge=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1                        # > 0 overrides epochs
    batch_size: int = Field(2, gt=0)
    grad_accum: int = Field(1, gt=0)
    eval_every: int = Field(20, ge=0)          # steps; 0 = no periodic eval
    save_every: int = Field(50, gt=0)          # checkpoint interval: the most a kill -9 can cost
    save_total_limit: int = Field(2, gt=0)
    seed: int = 0
    # outputs
    output_dir: str = ".flywheel/train/smollm2-lora"
    generations: int = Field(3, ge=0)          # eval prompts in the base-vs-adapter table (0 = skip)
    generation_max_new_tokens: int = Field(48, gt=0)
    tracking_uri: Optional[str] = None
    run_name: Optional[str] = None


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
    resumed_from, base_model, dataset_version, mine_run_id, generations, backend, device}; with dry_run:
    {dry_run: True, audit, example, ...} and no run. Raises ConfigError/InputError on bad config, data or audit.
    `callbacks`: extra transformers TrainerCallbacks (tests use one to interrupt a run).
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from flywheel.training.backends import prepare_backend, select_backend

    if not cfg.dataset and not cfg.dataset_version:
        raise ConfigError("dataset: give `dataset=<flywheel mine output dir>` or `dataset_version=<version>`")
    # 1. backend first: Unsloth must be imported before transformers/trl.
    backend = select_backend(cfg.backend)
    if cfg.load_in_4bit and backend.device != "cuda":
        raise ConfigError("load_in_4bit: QLoRA (4-bit) needs a CUDA GPU; this machine trains on "
                          f"{backend.device} (set load_in_4bit=false)")
    warnings = prepare_backend(backend)

    from flywheel.foundation.errors import InputError
    from flywheel.foundation.io import write_json
    from flywheel.training.audit import audit, check_audit, render_masked, tokenize_conversations, training_template
    from flywheel.training.data import load_sft_dataset
    from flywheel.training.models import linear_module_names, resolve_base_model

    # 2. base model identity and LoRA targets, before any weight loads (the dataset's version is checked first).
    dataset_path, mine_run_id = resolve_dataset(cfg)
    info = resolve_base_model(cfg.base_model, cfg.model_cache)
    have = linear_module_names(info.path)
    missing = [m for m in cfg.lora.target_modules if m not in have]
    if missing:
        raise ConfigError(f"lora.target_modules: {missing} not in {info.name} (its Linear layers: "
                          f"{', '.join(sorted(have))})")

    # 3. dataset.
    ds = load_sft_dataset(dataset_path)
    check_dataset_version(dataset_path, ds.version, cfg.dataset_version)  # re-mined between the two reads
    if mine_run_id is None:
        mine_run_id = find_mine_run(ds.version, cfg.tracking_uri)
    train_recs = ds.train[: cfg.max_train_examples] if cfg.max_train_examples else ds.train
    eval_recs = ds.eval[: cfg.eval_max_examples]

    # 4. tokenize exactly as the trainer will, audit the masks.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(info.path))
    inference_template = tokenizer.chat_template
    if cfg.chat_template:
        tpath = Path(cfg.chat_template)
        if not tpath.exists():
            raise ConfigError(f"chat_template: {tpath} does not exist")
        tmpl, note = tpath.read_text(encoding="utf-8"), f"chat_template file {tpath}"
    else:
        tmpl, note = training_template(tokenizer, [r["messages"] for r in train_recs], cfg.assistant_only_loss)
    tok_kw = dict(chat_template=tmpl, max_length=cfg.max_length, overlong=cfg.overlong,
                  assistant_only_loss=cfg.assistant_only_loss)
    tok_train = tokenize_conversations(train_recs, tokenizer, **tok_kw)
    tok_eval = tokenize_conversations(eval_recs, tokenizer, **tok_kw) if eval_recs else None
    report = audit(tok_train, tokenizer, note, cfg.eot_token, tok_eval)
    example = render_masked(tok_train.rows[0], tokenizer) if tok_train.rows else ""
    base = {"audit": report, "example": example, "base_model": info.to_dict(), "dataset_version": ds.version,
            "dataset_path": str(ds.path), "mine_run_id": mine_run_id, "backend": backend.name,
            "device": backend.device, "warnings": warnings}
    if dry_run:
        return {"dry_run": True, **base}
    check_audit(report)

    # 5. train.
    from flywheel.pipelines import tracking
    from flywheel.pipelines.config import flatten
    from flywheel.training.sft import SFTParams, build_trainer, generate_pairs, last_checkpoint, save_adapter, train

    out_dir = Path(cfg.output_dir)
    params = SFTParams(
        model_path=str(info.path), output_dir=str(out_dir / "checkpoints"), lora_r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules),
        learning_rate=cfg.learning_rate, lr_scheduler=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum, max_length=cfg.max_length, packing=cfg.packing, eval_every=cfg.eval_every,
        save_every=cfg.save_every, save_total_limit=cfg.save_total_limit,
        gradient_checkpointing=cfg.gradient_checkpointing, load_in_4bit=cfg.load_in_4bit, seed=cfg.seed)
    previous = _read_state(out_dir) if resume else {}
    ckpt = last_checkpoint(params.output_dir) if resume else None
    tags = {"flywheel.base_model": info.name, "flywheel.base_model_sha256": info.sha256,
            "flywheel.backend": backend.name, "flywheel.device": backend.device,
            "flywheel.train.resumed_from_checkpoint": ckpt.name if ckpt else None,
            "flywheel.train.resumed_from_run": previous.get("run_id") if ckpt else None}
    import mlflow

    with tracking.start_run(STAGE, cfg.run_name, inputs={"dataset_version": ds.version, "mine_run": mine_run_id},
                            tags=tags, params=flatten(cfg.model_dump()), configured_uri=cfg.tracking_uri) as run:
        run_id = run.info.run_id
        if ckpt and previous.get("run_id"):
            _close_killed_run(previous["run_id"])
        _write_state(out_dir, {"run_id": run_id, "config": cfg.model_dump()})
        mlflow.log_dict(report, "audit.json")
        mlflow.log_text(_config_yaml(cfg), "config.yaml")
        cbs = [MlflowStepCallback()] + ([RichProgressCallback()] if progress else []) + list(callbacks)
        trainer = build_trainer(params, backend, tokenizer, tok_train.rows,
                                tok_eval.rows if tok_eval and tok_eval.rows else None, cbs)
        stats = train(trainer, resume=resume)
        if trainer.state.global_step < (trainer.state.max_steps or 0):
            # Stopped early by a callback (control.should_training_stop): leave checkpoints for --resume, no adapter.
            mlflow.set_tag("flywheel.train.status", "interrupted")
            return {"run_id": run_id, "adapter_dir": None, "interrupted": True, **base, **stats}

        # 6. adapter + lineage file, atomically: a kill here leaves the previous adapter, never half of one.
        from flywheel.foundation.io import atomic_dir

        adapter_final = out_dir / "adapter"
        with atomic_dir(adapter_final) as tmp:
            save_adapter(trainer, tokenizer, tmp, inference_template)
            write_json(tmp / "flywheel_adapter.json", {
                "base_model": info.name, "base_model_sha256": info.sha256, "base_model_source": info.source,
                "dataset_version": ds.version, "mine_run_id": mine_run_id, "train_run_id": run_id,
                "chat_template": inference_template, "eos_tokens": _eos_tokens(tokenizer),
                "lora": cfg.lora.model_dump(), "global_step": stats["global_step"]})
        mlflow.log_artifacts(str(adapter_final), "adapter")
        gens: list[dict] = []
        if cfg.generations and ds.eval:
            prompts = [r["messages"][:-1] for r in ds.eval[: cfg.generations]]
            gens = generate_pairs(trainer.model, tokenizer, prompts, cfg.generation_max_new_tokens)
            for g, r in zip(gens, ds.eval):
                g["reference"] = r["messages"][-1]["content"]
            import pandas as pd

            mlflow.log_table(pd.DataFrame(gens), artifact_file="generations.json")
        summary = {"first_loss": stats["first_loss"], "final_loss": stats["final_loss"],
                   "train_loss": stats["train_loss"], "global_step": stats["global_step"]}
        if stats["eval_losses"]:
            summary["final_eval_loss"] = stats["eval_losses"][-1][1]
        tracking.log_metrics(summary)
        mlflow.set_tag("flywheel.train.status", "finished")
    if warnings:
        base["warnings"] = warnings
    return {"run_id": run_id, "adapter_dir": str(adapter_final.resolve()), "generations": gens, **base, **stats}


# -- dataset lookup ------------------------------------------------------------------------------------------

def resolve_dataset(cfg: TrainConfig) -> tuple[str, str | None]:
    """(dataset path, mine run id if known). By path, or by version via the `flywheel.dataset_version` tag."""
    from flywheel.foundation.errors import InputError

    if cfg.dataset:
        if Path(cfg.dataset).is_dir():  # a single file has no manifest: its content hash is checked after loading
            check_dataset_version(cfg.dataset, _manifest_version(cfg.dataset), cfg.dataset_version)
        return cfg.dataset, None
    if not cfg.dataset_version:
        raise ConfigError("dataset: give `dataset=<flywheel mine output dir>` or `dataset_version=<version>`")
    run = _mine_run_for_version(cfg.dataset_version, cfg.tracking_uri)
    if run is None:
        raise InputError(f"dataset_version: no run in flywheel/mine has flywheel.dataset_version="
                         f"{cfg.dataset_version!r}")
    path = run.data.tags.get("flywheel.dataset_path")
    if not path:
        raise InputError(f"dataset_version: mine run {run.info.run_id} has no flywheel.dataset_path tag")
    check_dataset_version(path, _manifest_version(path), cfg.dataset_version)
    return path, run.info.run_id


def _manifest_version(path: str | Path) -> str | None:
    import json

    mf = Path(path) / "manifest.json"
    try:
        return str(json.loads(mf.read_text(encoding="utf-8"))["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_dataset_version(path: str | Path, found: str | None, wanted: str | None) -> None:
    """The directory a version points at can be mined again into another version: training on it would give an
    adapter whose lineage tags name one dataset and whose weights learned another."""
    from flywheel.foundation.errors import InputError

    if wanted and found != wanted:
        raise InputError(f"dataset_version: {path} holds dataset version {found or '(no manifest.json)'}, not "
                         f"{wanted} (mined again since?); mine {wanted} again or train on dataset={path}")


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
            metrics = {k: logs[k] for k in ("loss", "eval_loss", "learning_rate", "grad_norm") if k in logs}
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

def _eos_tokens(tokenizer: Any) -> list[str]:
    # What stops generation: the eos token (`<|im_end|>` for ChatML), which the audit checked is trained.
    return [tokenizer.eos_token] if tokenizer.eos_token else []


def _config_yaml(cfg: TrainConfig) -> str:
    import yaml

    return f"# flywheel train --config <this file>\n" + yaml.safe_dump(cfg.model_dump(), sort_keys=False)


def _close_killed_run(run_id: str) -> None:
    """A kill -9 leaves its MLflow run RUNNING forever; the resumed run marks it KILLED (and links to it by tag)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
    except Exception:  # noqa: BLE001 - the old run may live in another store; lineage tag is still set
        pass


def _state_file(out_dir: Path) -> Path:
    return out_dir / "flywheel_train_state.json"


def _read_state(out_dir: Path) -> dict:
    try:
        return json.loads(_state_file(out_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_state(out_dir: Path, state: dict) -> None:
    from flywheel.foundation.io import write_json

    write_json(_state_file(out_dir), state)


# -- CLI -----------------------------------------------------------------------------------------------------

def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. dataset=out/mined lora.r=16"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help=f"YAML config (e.g. {DEFAULT_CONFIG})"),
        dry_run: bool = typer.Option(False, "--dry-run", help="tokenize, print the loss-mask audit and one "
                                     "example with masked tokens in [[ ]], then stop"),
        resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in output_dir"),
    ) -> None:
        """Train a LoRA adapter on a mined dataset (Unsloth on GPU, TRL+PEFT otherwise)."""
        from flywheel.pipelines.config import load_config

        cfg = load_config(TrainConfig, config, overrides or [])
        result = run_train(cfg, dry_run=dry_run, resume=resume, progress=not dry_run)
        _print_summary(result)
        if dry_run and not result["audit"]["ok"]:
            from flywheel.training.audit import check_audit

            check_audit(result["audit"])


def _print_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    a = result["audit"]
    t = Table(title="loss-mask audit", show_header=False)
    for k in ("template", "examples", "examples_used", "tokens_total", "tokens_trained", "trained_fraction",
              "trained_per_example", "zero_trained_examples", "eot_token", "eot_trained",
              "examples_with_eot_trained", "truncated", "dropped_overlong", "dropped_truncated_to_nothing"):
        t.add_row(k, str(a.get(k)))
    t.add_row("verdict", "[green]ok[/]" if a["ok"] else "[red]" + "; ".join(a["problems"]) + "[/]")
    con.print(t)
    con.print(f"base model {result['base_model']['name']} ({result['base_model']['sha256'][:12]}), dataset "
              f"{result['dataset_version']}, backend {result['backend']} on {result['device']}")
    for w in result.get("warnings") or []:
        con.print(f"[yellow]warning:[/] {w}")
    if result.get("dry_run"):
        con.print("example (masked, untrained tokens in [[ ]]):", style="bold")
        con.print(result["example"], markup=False, highlight=False)
        return
    if result.get("adapter_dir"):
        con.print(f"loss {result['first_loss']:.4f} -> {result['final_loss']:.4f} in {result['global_step']} "
                  f"steps; adapter {result['adapter_dir']}; MLflow run {result['run_id']}")
