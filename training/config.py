"""The `flywheel train` config: one model for both methods (SFT, DPO) and both backends (Unsloth, TRL).

Defaults train SmolLM2-135M on CPU. `flywheel.pipelines.config.load_config` reads a YAML file plus `key=value`
overrides into `TrainConfig`; unknown keys, and keys of the other method, are errors before any weights load.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from flywheel.foundation.config import StageConfig
from flywheel.foundation.io import home_path

# TRL's DPOTrainer loss types (trl.trainer.dpo_config.DPOConfig.loss_type).
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
DpoLossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]

# Keys that mean something for one method only: setting one under the other method is a mistake worth an error
# (a `packing: true` that DPO silently ignores is a setting the user believes is in effect).
SFT_ONLY = ("max_length", "overlong", "packing", "assistant_only_loss", "chat_template", "eot_token")
DPO_ONLY = ("init_adapter", "beta", "loss_type", "max_prompt_length", "max_completion_length",
            "preference_eval_fraction")


class LoraConfigSection(StageConfig):
    r: int = Field(8, gt=0, description="LoRA rank; higher = more capacity and memory")
    alpha: int = Field(16, gt=0, description="LoRA scaling numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input (0 = none)")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      min_length=1, description="names of the Linear layers that get an adapter "
                                      "(checked against the architecture before weights load)")


class TrainConfig(StageConfig):
    """Defaults train SmolLM2-135M on CPU; one config maps onto both backends."""

    method: Literal["sft", "dpo"] = Field(
        "sft", description="sft: supervised on train.jsonl conversations; dpo: preference pairs from "
        "preferences.jsonl (reference = the base with the adapter disabled)")
    # data
    dataset: Optional[str] = Field(None, description="a `flywheel mine` output dir (train.jsonl/eval.jsonl, "
                                   "preferences.jsonl for dpo) or one .jsonl file")
    dataset_version: Optional[str] = Field(None, description="or: the manifest version, looked up in "
                                           "`flywheel/mine` runs")
    max_train_examples: Optional[int] = Field(None, gt=0, description="use only the first N training examples "
                                              "(pairs for dpo); default all")
    eval_max_examples: int = Field(64, ge=0, description="eval on a fixed slice of this many examples: cheap "
                                   "enough to run every interval")
    max_length: int = Field(512, gt=8, description="sft: tokens per example (prompt + answer)")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="sft: over-long examples are cut at "
                                                  "max_length, or skipped; both counted in the audit")
    packing: bool = Field(False, description="sft: pack several examples into one max_length sequence")
    assistant_only_loss: bool = Field(True, description="sft: train on assistant turns (+ their end-of-turn "
                                      "token) only")
    chat_template: Optional[str] = Field(None, description="sft: path to a jinja template with {% generation %} "
                                         "markers; default derived from the tokenizer's")
    eot_token: Optional[str] = Field(None, description="sft: end-of-turn token the audit requires trained; "
                                     "default the eos token")
    # preference tuning
    init_adapter: Optional[str] = Field(None, description="dpo: start from this adapter (a path, runs:/… or "
                                        "models:/name@alias) trained on the same base; default a fresh LoRA")
    beta: float = Field(0.1, gt=0, description="dpo: strength of the pull towards the reference model (higher = "
                        "stays closer); for ipo the regularisation tau")
    loss_type: DpoLossType = Field("sigmoid", description="dpo: TRL preference loss (sigmoid = the DPO paper)")
    max_prompt_length: int = Field(256, gt=0, description="dpo: prompt tokens kept (the end, nearest the "
                                   "answer)")
    max_completion_length: int = Field(256, gt=0, description="dpo: tokens kept of each of chosen and rejected "
                                       "(the start)")
    preference_eval_fraction: float = Field(0.1, gt=0, lt=1, description="dpo: share of pairs held out by "
                                            "prompt hash when the dataset has no eval preferences")
    # model
    base_model: str = Field("smollm2-135m-instruct", description="catalog name, local HF dir, or hub id in the "
                            "local cache")
    model_cache: Optional[str] = Field(None, description="where dequantized base models are cached; default "
                                       "~/.cache/flywheel/models ($FLYWHEEL_CACHE)")
    backend: Literal["auto", "unsloth", "trl"] = Field("auto", description="auto: unsloth on CUDA with the gpu "
                                                       "extra, else trl; an explicit unsloth without CUDA is an error")
    load_in_4bit: bool = Field(False, description="QLoRA (4-bit base); CUDA only")
    lora: LoraConfigSection = Field(default_factory=LoraConfigSection, description="the LoRA adapter's shape")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, "
                                         "~30% slower")
    # optimisation
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="learning-rate schedule after warmup")
    warmup_steps: float = Field(0, ge=0, description="warmup steps; < 1 is a ratio of total steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    epochs: float = Field(1.0, gt=0, description="passes over the training set (when max_steps is -1)")
    max_steps: int = Field(-1, ge=-1, description="> 0 overrides epochs; -1 = train for `epochs`")
    batch_size: int = Field(2, gt=0, description="examples (pairs for dpo) per device per step")
    grad_accum: int = Field(1, gt=0, description="gradient accumulation steps per optimizer step")
    eval_every: int = Field(20, ge=0, description="steps between evals; 0 = no periodic eval")
    save_every: int = Field(50, gt=0, description="checkpoint interval: the most a kill -9 can cost")
    save_total_limit: int = Field(2, gt=0, description="checkpoints kept on disk")
    seed: int = Field(0, description="seed for init, shuffling and dropout")
    nproc: int = Field(1, gt=0, description="> 1 launches that many DDP ranks with torchrun on this machine "
                       "(CPU cores or GPUs)")
    ddp_timeout: int = Field(600, gt=0, description="seconds a rank waits for a dead or hung peer before it exits")
    # outputs
    output_dir: str = Field(default_factory=lambda: home_path("train", "smollm2-lora"),
                            description="checkpoints/ and adapter/ go here; default <FLYWHEEL_HOME>/train/smollm2-lora")
    generations: int = Field(3, ge=0, description="eval prompts in the base-vs-adapter table (0 = skip)")
    generation_max_new_tokens: int = Field(48, gt=0, description="tokens generated per prompt in that table")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or "
                                        "the project store")
    run_name: Optional[str] = Field(None, description="MLflow run name; default generated")

    @model_validator(mode="after")
    def _keys_of_the_method(self):
        other = SFT_ONLY if self.method == "dpo" else DPO_ONLY
        # A key written out at its default (a dumped config, e.g. the one DDP ranks read) changes nothing: only a
        # value that would be ignored is refused.
        wrong = [k for k in other if k in self.model_fields_set
                 and getattr(self, k) != type(self).model_fields[k].get_default(call_default_factory=True)]
        if wrong:
            raise ValueError(f"{wrong[0]} is a {'sft' if self.method == 'dpo' else 'dpo'}-only setting but "
                             f"method is {self.method} (remove it, or set method="
                             f"{'sft' if self.method == 'dpo' else 'dpo'})")
        return self
