"""Deterministic variant assignment for a serving system.

assign(unit_id, experiment, variants) hashes "experiment:unit_id" with SHA-256 (never Python's hash(), which
is salted per process) into a point of [0, 1) and picks the variant whose cumulative weight covers it. The
experiment name is the salt: the same user lands in independent buckets in different experiments, so one
experiment's split never leaks into another's. Same answer on every machine, process and Python version.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

from flywheel.foundation.errors import InputError


def bucket(unit_id: str | int, experiment: str) -> float:
    """Uniform point in [0, 1) from the first 8 bytes of sha256(experiment:unit_id)."""
    h = hashlib.sha256(f"{experiment}:{unit_id}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def _weights(variants: Mapping[str, float] | Sequence[str]) -> list[tuple[str, float]]:
    items = list(variants.items()) if isinstance(variants, Mapping) else [(v, 1.0) for v in variants]
    if not items:
        raise InputError("assign: no variants given")
    if any(w < 0 for _, w in items) or sum(w for _, w in items) <= 0:
        raise InputError(f"assign: weights must be >= 0 and sum > 0, got {dict(items)}")
    if len({v for v, _ in items}) != len(items):
        raise InputError("assign: duplicate variant names")
    return items


def assign(unit_id: str | int, experiment: str, variants: Mapping[str, float] | Sequence[str]) -> str:
    """Variant for this unit. `variants`: names (equal split) or {name: weight} (any positive scale)."""
    items = _weights(variants)
    total = sum(w for _, w in items)
    u = bucket(unit_id, experiment) * total
    acc = 0.0
    for name, w in items:
        acc += w
        if u < acc:
            return name
    return items[-1][0]  # u == total only by float rounding
