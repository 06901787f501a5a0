"""Opening a `flywheel mine` output directory: the one place that knows its layout.

Training reads `train.jsonl`/`eval.jsonl`, the eval stage reads `eval.jsonl`, the embeddings benchmark builds a
retrieval task from both; all of them need the manifest's `version` for lineage. They open the directory here, so
a missing split or a broken manifest reads the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flywheel.foundation.errors import InputError
from flywheel.foundation.io import read_json

# preferences.jsonl is the preference pairs' train split, preferences_eval.jsonl their eval split (split like
# train/eval, by hash of the prompt)
SPLITS = ("train", "eval", "preferences", "preferences_eval")


@dataclass
class MinedDataset:
    path: Path
    manifest: dict | None                  # manifest.json, None when the directory has none
    files: dict[str, Path] = field(default_factory=dict)  # split -> existing file

    @property
    def version(self) -> str | None:
        return None if self.manifest is None else self.manifest.get("version")


def open_dataset(path: str | Path, *, need: tuple[str, ...] = ()) -> MinedDataset:
    """The splits present in a mined dataset directory and its manifest; `need` names splits that must exist."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise InputError(f"{p}: not a directory (give a `flywheel mine` output directory)")
    files = {s: p / f"{s}.jsonl" for s in SPLITS if (p / f"{s}.jsonl").exists()}
    missing = [s for s in need if s not in files]
    if missing:
        raise InputError(f"{p}: no {missing[0]}.jsonl in the dataset directory (is it a `flywheel mine` output?)")
    if not files:
        raise InputError(f"{p}: not a mined dataset directory (no train.jsonl or eval.jsonl)")
    manifest = read_json(p / "manifest.json") if (p / "manifest.json").exists() else None
    return MinedDataset(path=p.resolve(), manifest=manifest, files=files)
