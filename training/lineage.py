"""The adapter directory a training run leaves: weights, tokenizer, and `flywheel_adapter.json` (its lineage).

The lineage file is what publish and the gate trust: the base model's weight hash (an adapter on another base loads
fine and produces gibberish), the dataset version, the runs, the chat template used at inference and the tokens
that stop generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flywheel.foundation.io import atomic_dir, write_json

LINEAGE_FILE = "flywheel_adapter.json"


def eos_tokens(tokenizer: Any) -> list[str]:
    # What stops generation: the eos token (`<|im_end|>` for ChatML), which the SFT audit checked is trained.
    return [tokenizer.eos_token] if tokenizer.eos_token else []


def adapter_lineage(base: Any, *, dataset_version: str, mine_run_id: str | None, train_run_id: str | None,
                    chat_template: str | None, tokenizer: Any, lora: dict, global_step: int,
                    method: str = "sft", **extra: Any) -> dict:
    """The content of flywheel_adapter.json; `base` is a `flywheel.training.models.BaseModelInfo`."""
    return {"base_model": base.name, "base_model_sha256": base.sha256, "base_model_source": base.source,
            "method": method, "dataset_version": dataset_version, "mine_run_id": mine_run_id,
            "train_run_id": train_run_id, "chat_template": chat_template, "eos_tokens": eos_tokens(tokenizer),
            "lora": lora, "global_step": global_step, **extra}


def write_adapter(model: Any, tokenizer: Any, dest: str | Path, chat_template: str | None, lineage: dict) -> Path:
    """Adapter + tokenizer + lineage, atomically: a kill here leaves the previous adapter, never half of one."""
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if chat_template and not (tmp / "chat_template.jinja").exists():
            (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        write_json(tmp / LINEAGE_FILE, lineage)
    return dest
