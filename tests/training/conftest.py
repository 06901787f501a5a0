"""Small chat datasets in the `flywheel mine` format, written directly (the tests must not depend on mining)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Peru", "Lima"),
            ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Chile", "Santiago"), ("Cuba", "Havana"),
            ("Greece", "Athens"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Ireland", "Dublin")]


def record(i: int, country: str, capital: str, split: str = "train") -> dict:
    # A distinctive answer style the base model does not produce: a few steps visibly change its outputs.
    return {"id": f"{split}-{i}", "rating": 5, "source": "test", "prompt_variant": "v1", "context": None,
            "cluster": f"c{i}",
            "messages": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": f"What is the capital of {country}?"},
                         {"role": "assistant",
                          "content": f"Flywheel fact: the capital of {country} is {capital}. Have a wonderful day!"}]}


def write_dataset(root: Path, n_train: int = 24, n_eval: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    train = [record(i, *CAPITALS[i % 12]) for i in range(n_train)]
    evals = [record(i, *CAPITALS[12 + i % 4], split="eval") for i in range(n_eval)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("sft") / "dataset")


def pair(i: int, country: str, capital: str) -> dict:
    return {"id": f"p{i}", "source": "test",
            "prompt": [{"role": "user", "content": f"What is the capital of {country}?"}],
            "chosen": [{"role": "assistant", "content": f"The capital of {country} is {capital}."}],
            "rejected": [{"role": "assistant", "content": f"I think {country} has no capital at all."}]}


def write_preferences(root: Path, n: int = 12, eval_file: bool = False) -> Path:
    """A mined-style directory with preferences.jsonl (and train.jsonl, as `flywheel mine` writes both)."""
    write_dataset(root, n_train=4, n_eval=2)
    pairs = [pair(i, *CAPITALS[i % len(CAPITALS)]) for i in range(n)]
    (root / "preferences.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return root
