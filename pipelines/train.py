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
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import typer

from flywheel.pipelines.config import ConfigError
# The config type lives with the training core; imported here for the CLI and callers.
from flywheel.training.config import TrainConfig
from flywheel.pipelines import tags as T


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


@dataclass
class Prepared:
    """What the phases before training hand on: base model, data, tokenizer and the audited token rows."""

    info: Any                    # flywheel.training.models.BaseModelInfo
    dataset: Any                 # SFTDataset (sft) or PreferenceDataset (dpo)
    mine_run_id: str | None
    tokenizer: Any
    inference_template: str | None
    train_rows: list[dict]
    eval_rows: list[dict]
    report: dict
    example: str = ""                                 # one training row rendered for --dry-run
    lineage: dict = field(default_factory=dict)       # method-specific keys for flywheel_adapter.json
    init_adapter_dir: str | None = None               # dpo: the adapter the policy starts from


def run_train(cfg: TrainConfig, dry_run: bool = False, resume: bool = False, *,
              callbacks: Sequence[Any] = (), progress: bool = False) -> dict:
    """Train (or audit, with dry_run) and log to MLflow `flywheel/train`.

    Returns {run_id, adapter_dir, audit, first_loss, final_loss, global_step, losses, eval_losses,
    resumed_from, base_model, dataset_version, mine_run_id, generations, backend, device, method}; with dry_run:
    {dry_run: True, audit, example, ...} and no run. Raises ConfigError/InputError on bad config, data or audit.
    `callbacks`: extra transformers TrainerCallbacks (tests use one to interrupt a run).
    """
    backend, warnings = _backend(cfg)                                  # 1.
    ds, mine_run_id = _dataset(cfg)  # 2. first: a re-mined dataset version fails before any weights resolve
    info = _base_model(cfg)                                            # 3.
    prep = (_prepare_dpo if cfg.method == "dpo" else _prepare_sft)(cfg, info, ds, mine_run_id)  # 4.
    base = {"audit": prep.report, "example": prep.example, "base_model": info.to_dict(),
            "dataset_version": ds.version, "dataset_path": str(ds.path), "mine_run_id": mine_run_id,
            "backend": backend.name, "device": backend.device, "warnings": warnings, "method": cfg.method}
    if dry_run:
        return {"dry_run": True, **base}
    _check_report(cfg, prep.report)
    launch = cfg.nproc > 1 and _world_size() == 1
    if launch:
        check_nproc(cfg.nproc, backend.device)
    out_dir = Path(cfg.output_dir)
    ckpt = _last_checkpoint(out_dir) if resume else None
    with _train_run(cfg, ds.version, mine_run_id, _tags(cfg, info, backend, launch, ckpt), prep.report, ckpt,
                    out_dir) as run_id:
        if launch:                                                     # 5. as DDP ranks
            return {**base, **launch_ranks(cfg, run_id, resume=resume, progress=progress)}
        trainer, stats = _fit(cfg, backend, prep, callbacks, progress, resume)  # 5. here
        if trainer.state.global_step < (trainer.state.max_steps or 0):
            # Stopped early by a callback (control.should_training_stop): leave checkpoints for --resume, no adapter.
            _set_status("interrupted")
            return {"run_id": run_id, "adapter_dir": None, "interrupted": True, **base, **stats}
        if not _is_main():  # the other ranks are done: rank 0 alone writes the adapter and the run's artifacts
            return {"run_id": run_id, "adapter_dir": None, **base, **stats}
        adapter_dir = _save_adapter(cfg, trainer, prep, run_id, stats)  # 6.
        gens = _log_outputs(cfg, trainer, prep, adapter_dir, stats)
    return {"run_id": run_id, "adapter_dir": str(adapter_dir.resolve()), "generations": gens, **base, **stats}


# -- the phases ----------------------------------------------------------------------------------------------

def _backend(cfg: TrainConfig) -> tuple[Any, list[str]]:
    """Offline mode, then the backend: Unsloth must be imported before transformers/trl."""
    import os

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    from flywheel.training.backends import prepare_backend, select_backend

    if not cfg.dataset and not cfg.dataset_version:
        raise ConfigError("dataset: give `dataset=<flywheel mine output dir>` or `dataset_version=<version>`")
    backend = select_backend(cfg.backend)
    if cfg.load_in_4bit and backend.device != "cuda":
        raise ConfigError("load_in_4bit: QLoRA (4-bit) needs a CUDA GPU; this machine trains on "
                          f"{backend.device} (set load_in_4bit=false)")
    if cfg.method == "dpo" and cfg.nproc > 1:
        raise ConfigError("nproc: DPO trains in one process (multi-process training is SFT only); set nproc=1")
    return backend, prepare_backend(backend)


def _base_model(cfg: TrainConfig) -> Any:
    """Base model identity and LoRA targets, before any weight loads."""
    from flywheel.training.models import linear_module_names, resolve_base_model

    info = resolve_base_model(cfg.base_model, cfg.model_cache)
    have = linear_module_names(info.path)
    missing = [m for m in cfg.lora.target_modules if m not in have]
    if missing:
        raise ConfigError(f"lora.target_modules: {missing} not in {info.name} (its Linear layers: "
                          f"{', '.join(sorted(have))})")
    return info


def _dataset(cfg: TrainConfig) -> tuple[Any, str | None]:
    """The dataset the method reads (conversations or preference pairs) and the mine run that made it."""
    dataset_path, mine_run_id = resolve_dataset(cfg)
    if cfg.method == "dpo":
        from flywheel.training.dpo import load_preference_dataset

        ds = load_preference_dataset(dataset_path, cfg.preference_eval_fraction)
    else:
        from flywheel.training.data import load_sft_dataset

        ds = load_sft_dataset(dataset_path)
    check_dataset_version(dataset_path, ds.version, cfg.dataset_version)  # re-mined between the two reads
    if mine_run_id is None:
        mine_run_id = find_mine_run(ds.version, cfg.tracking_uri)
    return ds, mine_run_id


def _prepare_sft(cfg: TrainConfig, info: Any, ds: Any, mine_run_id: str | None) -> Prepared:
    """Tokenize exactly as the trainer will and audit the loss masks."""
    from transformers import AutoTokenizer

    from flywheel.training.audit import audit, render_masked, tokenize_conversations, training_template

    train_recs = ds.train[: cfg.max_train_examples] if cfg.max_train_examples else ds.train
    eval_recs = ds.eval[: cfg.eval_max_examples]
    tokenizer = AutoTokenizer.from_pretrained(str(info.path))
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
    return Prepared(info, ds, mine_run_id, tokenizer, tokenizer.chat_template, tok_train.rows,
                    tok_eval.rows if tok_eval else [], report, example)


def _prepare_dpo(cfg: TrainConfig, info: Any, ds: Any, mine_run_id: str | None) -> Prepared:
    """The starting adapter (same base, by hash), then the pairs tokenized as the trainer takes them, audited."""
    from transformers import AutoTokenizer

    from flywheel.training.dpo import pair_audit, tokenize_pairs

    init = _init_adapter(cfg, info)
    tokenizer = AutoTokenizer.from_pretrained(str(info.path))
    train_pairs = ds.train[: cfg.max_train_examples] if cfg.max_train_examples else ds.train
    budgets = (cfg.max_prompt_length, cfg.max_completion_length)
    rows, facts = tokenize_pairs(train_pairs, tokenizer, *budgets)
    eval_rows, eval_facts = tokenize_pairs(ds.eval[: cfg.eval_max_examples], tokenizer, *budgets)
    report = pair_audit(facts, *budgets, eval_facts, ds.eval_source)
    example = json.dumps({k: train_pairs[0][k] for k in ("prompt", "chosen", "rejected")}, ensure_ascii=False,
                         indent=1) if train_pairs else ""
    lineage = {"beta": cfg.beta, "loss_type": cfg.loss_type, "reference": "base model (adapter disabled)",
               "init_adapter": init["uri"] if init else None,
               "init_adapter_train_run_id": init["run_id"] if init else None}
    return Prepared(info, ds, mine_run_id, tokenizer, tokenizer.chat_template, rows, eval_rows, report, example,
                    lineage, init["dir"] if init else None)


def _init_adapter(cfg: TrainConfig, info: Any) -> dict | None:
    """Resolve `init_adapter` (path, runs:/..., models:/...) and refuse one trained on another base."""
    if not cfg.init_adapter:
        return None
    from flywheel.foundation.errors import InputError
    from flywheel.pipelines import tracking
    from flywheel.pipelines.registry import resolve_model

    if cfg.init_adapter.startswith(("runs:/", "models:/")):
        tracking.setup(cfg.tracking_uri)
    m = resolve_model(cfg.init_adapter, "init_adapter")
    if m.meta.get("base_model_sha256") != info.sha256:
        raise InputError(f"init_adapter {cfg.init_adapter!r}: trained on {m.meta.get('base_model')} "
                         f"({str(m.meta.get('base_model_sha256'))[:12]}), not on base_model {info.name} "
                         f"({info.sha256[:12]}); an adapter only fits the weights it was trained on")
    return {"uri": m.uri, "dir": str(m.adapter_dir), "run_id": m.run_id}


def _check_report(cfg: TrainConfig, report: dict) -> None:
    if cfg.method == "dpo":
        from flywheel.training.dpo import check_pair_audit

        check_pair_audit(report)
    else:
        from flywheel.training.audit import check_audit

        check_audit(report)


def _tags(cfg: TrainConfig, info: Any, backend: Any, launch: bool, ckpt: Path | None) -> dict:
    return {T.BASE_MODEL: info.name, T.BASE_MODEL_SHA256: info.sha256,
            T.BACKEND: backend.name, T.DEVICE: backend.device, T.TRAIN_METHOD: cfg.method,
            T.TRAIN_NPROC: max(cfg.nproc if launch else 1, _world_size()),
            T.TRAIN_RESUMED_FROM_CHECKPOINT: ckpt.name if ckpt else None}


def _fit(cfg: TrainConfig, backend: Any, prep: Prepared, callbacks: Sequence[Any], progress: bool,
         resume: bool) -> tuple[Any, dict]:
    """Build the method's trainer and run it; rank 0 alone reports to MLflow and the terminal."""
    from flywheel.training.sft import train

    cbs = ([MlflowStepCallback()] + ([RichProgressCallback()] if progress else [])) if _is_main() else []
    cbs += list(callbacks)
    if cfg.method == "dpo":
        from flywheel.training.dpo import build_dpo_trainer, reward_history

        trainer = build_dpo_trainer(_dpo_params(cfg, prep), backend, prep.tokenizer, prep.train_rows,
                                    prep.eval_rows or None, cbs)
        return trainer, {**train(trainer, resume=resume), "eval_rewards": reward_history(trainer)}
    else:
        from flywheel.training.sft import build_trainer

        trainer = build_trainer(_sft_params(cfg, prep), backend, prep.tokenizer, prep.train_rows,
                                prep.eval_rows or None, cbs)
    return trainer, train(trainer, resume=resume)


def _sft_params(cfg: TrainConfig, prep: Prepared) -> Any:
    from flywheel.training.sft import SFTParams

    return SFTParams(
        model_path=str(prep.info.path), output_dir=str(Path(cfg.output_dir) / "checkpoints"), lora_r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules),
        learning_rate=cfg.learning_rate, lr_scheduler=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum, max_length=cfg.max_length, packing=cfg.packing, eval_every=cfg.eval_every,
        save_every=cfg.save_every, save_total_limit=cfg.save_total_limit,
        gradient_checkpointing=cfg.gradient_checkpointing, load_in_4bit=cfg.load_in_4bit, seed=cfg.seed,
        ddp_timeout=cfg.ddp_timeout)


def _dpo_params(cfg: TrainConfig, prep: Prepared) -> Any:
    from flywheel.training.dpo import DPOParams

    sft = _sft_params(cfg, prep)
    return DPOParams(**{**sft.to_dict(), "packing": False}, beta=cfg.beta, loss_type=cfg.loss_type,
                     max_prompt_length=cfg.max_prompt_length, max_completion_length=cfg.max_completion_length,
                     init_adapter_dir=prep.init_adapter_dir)


def _save_adapter(cfg: TrainConfig, trainer: Any, prep: Prepared, run_id: str | None, stats: dict) -> Path:
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


def _log_outputs(cfg: TrainConfig, trainer: Any, prep: Prepared, adapter_dir: Path, stats: dict) -> list[dict]:
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
    if _is_main():
        import mlflow

        mlflow.set_tag(T.TRAIN_STATUS, status)


def _is_main() -> bool:
    from flywheel.training.sft import is_main_process

    return is_main_process()


def _world_size() -> int:
    from flywheel.training.sft import world_size

    return world_size()


def _last_checkpoint(out_dir: Path) -> Path | None:
    from flywheel.training.sft import last_checkpoint

    return last_checkpoint(out_dir / "checkpoints")


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
    tags = {**tags, T.TRAIN_RESUMED_FROM_RUN: previous.get("run_id")}
    with tracking.start_run(STAGE, cfg.run_name, inputs={T.IN_DATASET_VERSION: dataset_version, T.IN_MINE_RUN: mine_run_id},
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
        if Path(cfg.dataset).is_dir():  # a single file has no manifest: its content hash is checked after loading
            check_dataset_version(cfg.dataset, _manifest_version(cfg.dataset), cfg.dataset_version)
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
    check_dataset_version(path, _manifest_version(path), cfg.dataset_version)
    return path, run.info.run_id


def _manifest_version(path: str | Path) -> str | None:
    """The mined dataset's version, or None where there is no readable manifest (the check then says so)."""
    from flywheel.foundation.errors import InputError
    from flywheel.mining.dataset import open_dataset

    try:
        version = open_dataset(path).version
    except InputError:
        return None
    return None if version is None else str(version)


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
            _check_report(cfg, result["audit"])


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
