"""The phases of `flywheel train` as plain functions over its config: checks, data, audit, fit.

Backend and config checks, the base model's LoRA targets (on the meta device), the dataset and its version, the
tokenization + audit exactly as the trainer will see the rows, and the method's trainer run with the callbacks it
is given. The shell (`flywheel.pipelines.train`) adds the MLflow lookups, the run, its callbacks and the progress.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from flywheel.foundation.config import ConfigError
from flywheel.foundation.errors import InputError
from flywheel.training.config import TrainConfig


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


def backend(cfg: TrainConfig) -> tuple[Any, list[str]]:
    """Offline mode, then the backend: Unsloth must be imported before transformers/trl. -> (backend, warnings)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    from flywheel.training.backends import prepare_backend, select_backend

    if not cfg.dataset and not cfg.dataset_version:
        raise ConfigError("dataset: give `dataset=<flywheel mine output dir>` or `dataset_version=<version>`")
    chosen = select_backend(cfg.backend)
    if cfg.load_in_4bit and chosen.device != "cuda":
        raise ConfigError("load_in_4bit: QLoRA (4-bit) needs a CUDA GPU; this machine trains on "
                          f"{chosen.device} (set load_in_4bit=false)")
    if cfg.method == "dpo" and cfg.nproc > 1:
        raise ConfigError("nproc: DPO trains in one process (multi-process training is SFT only); set nproc=1")
    return chosen, prepare_backend(chosen)


def base_model(cfg: TrainConfig) -> Any:
    """Base model identity and LoRA targets, before any weight loads."""
    from flywheel.training.models import linear_module_names, resolve_base_model

    info = resolve_base_model(cfg.base_model, cfg.model_cache)
    have = linear_module_names(info.path)
    missing = [m for m in cfg.lora.target_modules if m not in have]
    if missing:
        raise ConfigError(f"lora.target_modules: {missing} not in {info.name} (its Linear layers: "
                          f"{', '.join(sorted(have))})")
    return info


# -- the dataset ---------------------------------------------------------------------------------------------

def load_dataset(cfg: TrainConfig, path: str | Path) -> Any:
    """The dataset the method reads (conversations or preference pairs), checked against `dataset_version`."""
    if cfg.method == "dpo":
        from flywheel.training.dpo import load_preference_dataset

        ds = load_preference_dataset(path, cfg.preference_eval_fraction)
    else:
        from flywheel.training.data import load_sft_dataset

        ds = load_sft_dataset(path)
    check_dataset_version(path, ds.version, cfg.dataset_version)  # re-mined between the two reads
    return ds


def manifest_version(path: str | Path) -> str | None:
    """The mined dataset's version, or None where there is no readable manifest (the check then says so)."""
    from flywheel.mining.dataset import open_dataset

    try:
        version = open_dataset(path).version
    except InputError:
        return None
    return None if version is None else str(version)


def check_dataset_version(path: str | Path, found: str | None, wanted: str | None) -> None:
    """The directory a version points at can be mined again into another version: training on it would give an
    adapter whose lineage tags name one dataset and whose weights learned another."""
    if wanted and found != wanted:
        raise InputError(f"dataset_version: {path} holds dataset version {found or '(no manifest.json)'}, not "
                         f"{wanted} (mined again since?); mine {wanted} again or train on dataset={path}")


# -- tokenize and audit --------------------------------------------------------------------------------------

def prepare_sft(cfg: TrainConfig, info: Any, ds: Any, mine_run_id: str | None) -> Prepared:
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


def prepare_dpo(cfg: TrainConfig, info: Any, ds: Any, mine_run_id: str | None, init: dict | None) -> Prepared:
    """The pairs tokenized as the trainer takes them, audited. `init`: the starting adapter {uri, dir, run_id}
    (already checked to fit this base, `check_init_adapter`), or None to start from a fresh LoRA."""
    from transformers import AutoTokenizer

    from flywheel.training.dpo import pair_audit, tokenize_pairs

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


def check_init_adapter(reference: str, meta: dict, info: Any) -> None:
    """Refuse a starting adapter trained on another base: an adapter only fits the weights it was trained on."""
    if meta.get("base_model_sha256") != info.sha256:
        raise InputError(f"init_adapter {reference!r}: trained on {meta.get('base_model')} "
                         f"({str(meta.get('base_model_sha256'))[:12]}), not on base_model {info.name} "
                         f"({info.sha256[:12]}); an adapter only fits the weights it was trained on")


def check_report(method: str, report: dict) -> None:
    """Raise the audit's refusal (InputError) when the audited rows would train nothing useful."""
    if method == "dpo":
        from flywheel.training.dpo import check_pair_audit

        check_pair_audit(report)
    else:
        from flywheel.training.audit import check_audit

        check_audit(report)


# -- trainer parameters --------------------------------------------------------------------------------------

def sft_params(cfg: TrainConfig, prep: Prepared) -> Any:
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


def dpo_params(cfg: TrainConfig, prep: Prepared) -> Any:
    from flywheel.training.dpo import DPOParams

    sft = sft_params(cfg, prep)
    return DPOParams(**{**sft.to_dict(), "packing": False}, beta=cfg.beta, loss_type=cfg.loss_type,
                     max_prompt_length=cfg.max_prompt_length, max_completion_length=cfg.max_completion_length,
                     init_adapter_dir=prep.init_adapter_dir)


def fit(cfg: TrainConfig, chosen_backend: Any, prep: Prepared, callbacks: Sequence[Any], resume: bool
        ) -> tuple[Any, dict]:
    """Build the method's trainer with `callbacks` and run it. -> (trainer, stats; DPO adds `eval_rewards`)."""
    from flywheel.training.sft import train

    if cfg.method == "dpo":
        from flywheel.training.dpo import build_dpo_trainer, reward_history

        trainer = build_dpo_trainer(dpo_params(cfg, prep), chosen_backend, prep.tokenizer, prep.train_rows,
                                    prep.eval_rows or None, list(callbacks))
        return trainer, {**train(trainer, resume=resume), "eval_rewards": reward_history(trainer)}
    from flywheel.training.sft import build_trainer

    trainer = build_trainer(sft_params(cfg, prep), chosen_backend, prep.tokenizer, prep.train_rows,
                            prep.eval_rows or None, list(callbacks))
    return trainer, train(trainer, resume=resume)
