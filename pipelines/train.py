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

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import typer
from pydantic import Field

from flywheel.pipelines.config import ConfigError, StageConfig
from flywheel.pipelines.tracking import home_path

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
    max_steps: int = Field(-1, ge=-1)          # > 0 overrides epochs; -1 = train for `epochs`
    batch_size: int = Field(2, gt=0)
    grad_accum: int = Field(1, gt=0)
    eval_every: int = Field(20, ge=0)          # steps; 0 = no periodic eval
    save_every: int = Field(50, gt=0)          # checkpoint interval: the most a kill -9 can cost
    save_total_limit: int = Field(2, gt=0)
    seed: int = 0
    # processes: > 1 launches that many DDP ranks with torchrun on this machine (CPU cores or GPUs)
    nproc: int = Field(1, gt=0)
    ddp_timeout: int = Field(600, gt=0)        # seconds a rank waits for a dead or hung peer before it exits
    # outputs
    output_dir: str = Field(default_factory=lambda: home_path("train", "smollm2-lora"))  # <FLYWHEEL_HOME>/train/...
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

    # 2. base model identity and LoRA targets, before any weight loads.
    info = resolve_base_model(cfg.base_model, cfg.model_cache)
    have = linear_module_names(info.path)
    missing = [m for m in cfg.lora.target_modules if m not in have]
    if missing:
        raise ConfigError(f"lora.target_modules: {missing} not in {info.name} (its Linear layers: "
                          f"{', '.join(sorted(have))})")

    # 3. dataset.
    dataset_path, mine_run_id = resolve_dataset(cfg)
    ds = load_sft_dataset(dataset_path)
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

    # 5. train: here, or as `nproc` DDP ranks under torchrun (rank 0 alone logs, checkpoints and saves).
    from flywheel.training.sft import SFTParams, is_main_process, last_checkpoint, world_size

    out_dir = Path(cfg.output_dir)
    params = SFTParams(
        model_path=str(info.path), output_dir=str(out_dir / "checkpoints"), lora_r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules),
        learning_rate=cfg.learning_rate, lr_scheduler=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum, max_length=cfg.max_length, packing=cfg.packing, eval_every=cfg.eval_every,
        save_every=cfg.save_every, save_total_limit=cfg.save_total_limit,
        gradient_checkpointing=cfg.gradient_checkpointing, load_in_4bit=cfg.load_in_4bit, seed=cfg.seed,
        ddp_timeout=cfg.ddp_timeout)
    launch = cfg.nproc > 1 and world_size() == 1
    if launch:
        check_nproc(cfg.nproc, backend.device)
    ckpt = last_checkpoint(params.output_dir) if resume else None
    tags = {"flywheel.base_model": info.name, "flywheel.base_model_sha256": info.sha256,
            "flywheel.backend": backend.name, "flywheel.device": backend.device,
            "flywheel.train.nproc": max(cfg.nproc if launch else 1, world_size()),
            "flywheel.train.resumed_from_checkpoint": ckpt.name if ckpt else None}
    main = is_main_process()
    with _train_run(cfg, ds.version, mine_run_id, tags, report, ckpt, out_dir) as run_id:
        if launch:
            stats = launch_ranks(cfg, run_id, resume=resume, progress=progress)
            return {**base, **stats}
        from flywheel.training.sft import build_trainer, generate_pairs, save_adapter, train

        cbs = ([MlflowStepCallback()] + ([RichProgressCallback()] if progress else [])) if main else []
        trainer = build_trainer(params, backend, tokenizer, tok_train.rows,
                                tok_eval.rows if tok_eval and tok_eval.rows else None, cbs + list(callbacks))
        stats = train(trainer, resume=resume)
        if trainer.state.global_step < (trainer.state.max_steps or 0):
            # Stopped early by a callback (control.should_training_stop): leave checkpoints for --resume, no adapter.
            if main:
                import mlflow

                mlflow.set_tag("flywheel.train.status", "interrupted")
            return {"run_id": run_id, "adapter_dir": None, "interrupted": True, **base, **stats}
        if not main:  # the other ranks are done: rank 0 alone writes the adapter and the run's artifacts
            return {"run_id": run_id, "adapter_dir": None, **base, **stats}

        # 6. adapter + lineage file, atomically: a kill here leaves the previous adapter, never half of one.
        import mlflow

        from flywheel.pipelines import tracking
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


# -- the run and the ranks ---------------------------------------------------------------------------------

# `flywheel train --nproc N` opens the MLflow run in the parent and hands its id to rank 0 through the
# environment, so a DDP job is one run however many processes train; other ranks never touch MLflow.
RUN_ID_ENV = "FLYWHEEL_TRAIN_RUN_ID"
RESULT_ENV = "FLYWHEEL_TRAIN_RESULT"      # where rank 0 writes its result dict for the parent


@contextlib.contextmanager
def _train_run(cfg: TrainConfig, dataset_version: str, mine_run_id: str | None, tags: dict, report: dict,
               ckpt: Path | None, out_dir: Path) -> Iterator[str | None]:
    """The MLflow run this training logs into; yields its id (None on a rank > 0 of a self-launched job)."""
    import os

    from flywheel.training.sft import is_main_process

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
    previous = _read_state(out_dir) if ckpt else {}
    tags = {**tags, "flywheel.train.resumed_from_run": previous.get("run_id")}
    with tracking.start_run(STAGE, cfg.run_name, inputs={"dataset_version": dataset_version, "mine_run": mine_run_id},
                            tags=tags, params=flatten(cfg.model_dump()), configured_uri=cfg.tracking_uri) as run:
        run_id = run.info.run_id
        if previous.get("run_id"):
            _close_killed_run(previous["run_id"])
        _write_state(out_dir, {"run_id": run_id, "config": cfg.model_dump()})
        mlflow.log_dict(report, "audit.json")
        mlflow.log_text(_config_yaml(cfg), "config.yaml")
        yield run_id


def available_workers(device: str) -> tuple[int, str]:
    """How many DDP ranks this machine can host: one per GPU, or one per CPU core this process may use."""
    import os

    if device == "cuda":
        import torch

        return torch.cuda.device_count(), "CUDA devices"
    try:
        return len(os.sched_getaffinity(0)), "CPU cores"
    except AttributeError:  # not Linux
        return os.cpu_count() or 1, "CPU cores"


def check_nproc(nproc: int, device: str) -> None:
    if device == "mps":
        raise ConfigError("nproc: multi-process training needs CPU (gloo) or CUDA (nccl); MPS has no DDP backend")
    have, what = available_workers(device)
    if nproc > have:
        raise ConfigError(f"nproc: {nproc} processes but this machine has {have} {what}; use nproc<={have}, or "
                          "run torchrun on several nodes (README, Stage: train)")


def launch_ranks(cfg: TrainConfig, run_id: str, *, resume: bool, progress: bool) -> dict:
    """Run the recipe as `cfg.nproc` DDP ranks under torchrun; return rank 0's result.

    torchrun rather than `accelerate launch`: it ships with torch (no config file to keep in sync), its agent
    stops every rank as soon as one fails, and the Trainer reads the env it sets. The child stays in our process
    group (Ctrl-C reaches every rank), gets SIGTERM if we die, and SIGTERM/SIGHUP sent to us are forwarded.
    """
    import os
    import subprocess
    import sys
    import tempfile

    from flywheel.pipelines import tracking
    from flywheel.foundation.errors import FlywheelError

    with tempfile.TemporaryDirectory(prefix="flywheel-ddp-") as tmp:
        cfg_path, result_path = Path(tmp) / "config.yaml", Path(tmp) / "result.json"
        cfg_path.write_text(_config_yaml(cfg), encoding="utf-8")
        # Ranks run with this interpreter and environment, so they import this very installed `flywheel`.
        env = {**os.environ, RUN_ID_ENV: run_id, RESULT_ENV: str(result_path),
               "MLFLOW_TRACKING_URI": tracking.tracking_uri(cfg.tracking_uri)}
        # One core per rank by default: N ranks x all cores each would oversubscribe the CPU.
        env.setdefault("OMP_NUM_THREADS", str(max(1, available_workers("cpu")[0] // cfg.nproc)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(cfg.nproc), "-m", "flywheel.pipelines.train_worker", "--config", str(cfg_path)]
        cmd += (["--resume"] if resume else []) + (["--progress"] if progress else [])
        proc = subprocess.Popen(cmd, env=env, start_new_session=False, preexec_fn=_die_with_parent)
        previous = _forward_signals(proc)
        try:
            rc = proc.wait()
        finally:
            _restore_signals(previous)
            if proc.poll() is None:
                proc.terminate()  # torchrun stops its ranks on SIGTERM
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if rc != 0:
            raise FlywheelError(f"train: a rank failed under torchrun (exit code {rc}, its error is above); the "
                                f"other ranks were stopped and no adapter was written; checkpoints in "
                                f"{Path(cfg.output_dir) / 'checkpoints'} continue with --resume")
        if not result_path.exists():
            raise FlywheelError("train: torchrun exited 0 but rank 0 reported no result")
        return json.loads(result_path.read_text(encoding="utf-8"))


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG), so no orphan ranks."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass


def _forward_signals(proc: Any) -> dict:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, lambda s, _f: proc.send_signal(s)) for sig in (signal.SIGTERM, signal.SIGHUP)}


def _restore_signals(previous: dict) -> None:
    import signal

    for sig, handler in previous.items():
        signal.signal(sig, handler)


# -- dataset lookup ------------------------------------------------------------------------------------------

def resolve_dataset(cfg: TrainConfig) -> tuple[str, str | None]:
    """(dataset path, mine run id if known). By path, or by version via the `flywheel.dataset_version` tag."""
    from flywheel.foundation.errors import InputError

    if cfg.dataset:
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
    runs = client.search_runs([exp.experiment_id], f"tags.`flywheel.dataset_version` = '{safe}'",
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
        nproc: Optional[int] = typer.Option(None, "--nproc", help="DDP processes on this machine (torchrun); "
                                            "same as nproc=N"),
    ) -> None:
        """Train a LoRA adapter on a mined dataset (Unsloth on GPU, TRL+PEFT otherwise)."""
        from flywheel.pipelines.config import load_config

        cfg = load_config(TrainConfig, config, (overrides or []) + ([f"nproc={nproc}"] if nproc else []))
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
