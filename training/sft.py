"""The LoRA SFT recipe: pre-tokenized rows in, adapter directory out. No MLflow, no config parsing, no printing.

Features (and their trade-offs):
- One set of hyperparameters (`SFTParams`) drives both backends: TRL's `SFTTrainer` + a PEFT `LoraConfig`, or
  Unsloth's `FastLanguageModel` (CUDA only; QLoRA 4-bit there). Unsloth's LoRA is the same PEFT LoRA, so the
  adapter files are interchangeable.
- The rows carry their own `labels` (see `flywheel.training.audit`): the trainer trains exactly what the audit checked.
- Checkpoints every `save_every` steps (adapter + optimizer + scheduler + RNG + trainer state); `resume` restarts
  from the newest complete one, so a kill -9 costs at most `save_every` steps and continues with the same
  optimizer moments and step count.
- TRL's defaults that differ from what a user means are set explicitly: learning rate, no gradient checkpointing
  on CPU (it saves memory a 135M model does not need and costs ~30% speed), fp32 on CPU, `report_to="none"`
  (the shell logs to MLflow itself, batched, through a callback).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from flywheel.training.backends import Backend


@dataclass
class SFTParams:
    model_path: str
    output_dir: str
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_steps: float = 0
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = -1              # > 0 overrides epochs
    batch_size: int = 2
    grad_accum: int = 1
    eval_batch_size: int = 4
    max_length: int = 512
    packing: bool = False
    eval_every: int = 0              # steps; 0 = only at the end
    save_every: int = 50
    save_total_limit: int = 2
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False
    seed: int = 0
    logging_steps: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that finished writing (a kill -9 mid-save leaves one without trainer_state.json)."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    done = []
    for p in out.glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit() and (p / "trainer_state.json").exists() and (p / "optimizer.pt").exists() and \
                any(p.glob("adapter_model.*")):
            done.append((int(suffix), p))
    return max(done)[1] if done else None


def load_model(params: SFTParams, backend: Backend, tokenizer: Any):
    """Base model (+ LoRA for Unsloth). Returns (model, peft_config or None: TRL wraps the model itself)."""
    import torch

    if backend.name == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_name=params.model_path, max_seq_length=params.max_length,
                                                     dtype=None, load_in_4bit=params.load_in_4bit)
        model = FastLanguageModel.get_peft_model(
            model, r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
            target_modules=list(params.target_modules), bias="none",
            use_gradient_checkpointing="unsloth" if params.gradient_checkpointing else False,
            random_state=params.seed)
        return model, None

    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if backend.device == "cuda":
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if params.load_in_4bit:  # QLoRA through bitsandbytes; only on CUDA (checked by the shell)
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=kwargs["dtype"])
    else:
        kwargs["dtype"] = torch.float32  # CPU bf16 matmuls are slower than fp32 on most CPUs
    model = AutoModelForCausalLM.from_pretrained(params.model_path, **kwargs)
    if params.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing)
    peft_config = LoraConfig(r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                             target_modules=list(params.target_modules), bias="none", task_type="CAUSAL_LM")
    return model, peft_config


def sft_config(params: SFTParams, backend: Backend, has_eval: bool):
    import torch
    from trl import SFTConfig

    on_cuda = backend.device == "cuda"
    bf16 = on_cuda and torch.cuda.is_bf16_supported()
    eval_every = params.eval_every if has_eval and params.eval_every > 0 else 0
    return SFTConfig(
        output_dir=params.output_dir,
        num_train_epochs=params.epochs,
        max_steps=params.max_steps if params.max_steps and params.max_steps > 0 else -1,
        per_device_train_batch_size=params.batch_size,
        per_device_eval_batch_size=params.eval_batch_size,
        gradient_accumulation_steps=params.grad_accum,
        learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler,
        warmup_steps=params.warmup_steps,
        weight_decay=params.weight_decay,
        max_length=params.max_length,
        packing=params.packing,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every or None,
        save_strategy="steps",
        save_steps=params.save_every,
        save_total_limit=params.save_total_limit,
        logging_steps=params.logging_steps,
        logging_first_step=True,
        seed=params.seed,
        data_seed=params.seed,
        bf16=bf16,
        fp16=on_cuda and not bf16,
        use_cpu=backend.device == "cpu",
        activation_checkpointing=params.gradient_checkpointing and backend.name != "unsloth",
        optim="adamw_torch",
        report_to="none",
        disable_tqdm=True,                     # the shell draws its own progress bar
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        dataset_num_proc=None,
        assistant_only_loss=False,             # labels come pre-masked (training.audit); TRL uses them as is
        completion_only_loss=False,
    )


def build_trainer(params: SFTParams, backend: Backend, tokenizer: Any, train_rows: list[dict],
                  eval_rows: list[dict] | None, callbacks: Sequence[Any] = ()):
    """The `SFTTrainer` both backends use (Unsloth patches it in place when imported)."""
    from datasets import Dataset
    from trl import SFTTrainer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model, peft_config = load_model(params, backend, tokenizer)
    train_ds = Dataset.from_list(train_rows)
    eval_ds = Dataset.from_list(eval_rows) if eval_rows else None
    args = sft_config(params, backend, has_eval=bool(eval_rows))
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # no printing from training/: the shell reports through callbacks
    return trainer


def train(trainer: Any, resume: bool = False) -> dict:
    """Run (or resume) training. Returns the loss history and where it resumed from."""
    ckpt = last_checkpoint(trainer.args.output_dir) if resume else None
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    history = trainer.state.log_history
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    return {
        "resumed_from": str(ckpt) if ckpt else None,
        "global_step": trainer.state.global_step,
        "train_loss": getattr(result, "training_loss", None),
        "losses": losses,
        "eval_losses": evals,
        "first_loss": losses[0][1] if losses else None,
        "final_loss": losses[-1][1] if losses else None,
        "tokens_seen": getattr(trainer.state, "num_input_tokens_seen", None),
        "runtime_s": (result.metrics or {}).get("train_runtime") if result is not None else None,
    }


def save_adapter(trainer: Any, tokenizer: Any, out_dir: str | Path, chat_template: str | None = None) -> Path:
    """Adapter weights + config + tokenizer (with the chat template used at inference, not the training one)."""
    out = Path(out_dir)
    trainer.model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if chat_template and not (out / "chat_template.jinja").exists():
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return out


def generate_pairs(model: Any, tokenizer: Any, conversations: list[list[dict]], max_new_tokens: int = 48
                   ) -> list[dict]:
    """Greedy generations, base (adapter disabled) vs adapter, for a few prompts: the sanity table in MLflow."""
    import torch

    rows = []
    model.eval()
    device = next(model.parameters()).device
    for msgs in conversations:
        enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt").to(device)
        n = enc["input_ids"].shape[1]
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            with model.disable_adapter():
                base = model.generate(**enc, **kw)[0, n:]
            tuned = model.generate(**enc, **kw)[0, n:]
        rows.append({"prompt": msgs[-1]["content"],
                     "base": tokenizer.decode(base, skip_special_tokens=True),
                     "adapter": tokenizer.decode(tuned, skip_special_tokens=True)})
    return rows
