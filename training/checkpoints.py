"""What a training output directory keeps for `--resume`: the Trainer's checkpoints and which run wrote them.

    <output_dir>/checkpoints/checkpoint-<step>/   the Trainer's (newest complete one is resumed)
    <output_dir>/flywheel_train_state.json        {"run_id", "config"} of the run that is writing checkpoints
"""

from __future__ import annotations

import json
from pathlib import Path

from flywheel.foundation.io import write_json
from flywheel.training.sft import last_checkpoint

STATE_FILE = "flywheel_train_state.json"


def resume_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint under `out_dir`/checkpoints, or None."""
    return last_checkpoint(out_dir / "checkpoints")


def state_file(out_dir: Path) -> Path:
    return out_dir / STATE_FILE


def read_state(out_dir: Path) -> dict:
    """The state the last run left, or {} (none yet, or unreadable: a resumed run then just has no predecessor)."""
    try:
        return json.loads(state_file(out_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_state(out_dir: Path, state: dict) -> None:
    write_json(state_file(out_dir), state)
