"""Deterministic train/eval split by hashing a group key (the dedupe cluster's conversation/tree id).

A hash, not a random draw: the same conversation lands in the same split on every run and machine, and a new
batch of logs never moves an old conversation from train to eval. Hashing the *cluster's* group (the oasst tree,
the chat-log conversation) keeps duplicates and sibling answers to one prompt on the same side.
"""

from __future__ import annotations

import hashlib


def split_of(group: str, eval_fraction: float, salt: str = "flywheel") -> str:
    if eval_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.sha256(f"{salt}\x1f{group}".encode()).digest()[:8], "big")
    return "eval" if h / 2**64 < eval_fraction else "train"
