"""Preference pairs (`prompt`, `chosen`, `rejected`, conversational format as TRL's DPOTrainer reads it).

Three sources:
- hh-rlhf pairs (readers.hh_event), as they are;
- oasst sibling ranks (readers.rank_preferences): the best-ranked reply against up to N worse siblings;
- rating gaps: answers to the same prompt (same history and context) whose ratings differ by >= `min_gap`;
  the best- and the worst-rated answer form one pair per prompt.

Rating gaps need every answer to a prompt, which can be anywhere in a huge input. `GapMiner` spills the
candidates into hash buckets on disk and mines one bucket at a time, so memory is O(input / buckets).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator


def pref_id(pref: dict) -> str:
    text = json.dumps([pref["prompt"], pref["chosen"], pref["rejected"]], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def best_vs_worst(items: list[tuple], min_gap: int) -> dict | None:
    """items: (key, rating, id, source, prompt_messages, context, answer) for one prompt -> a pair or None."""
    if len(items) < 2:
        return None
    # Ties broken by id so the pair does not depend on input order.
    hi = max(items, key=lambda t: (t[1], _neg(t[2])))
    lo = min(items, key=lambda t: (t[1], t[2]))
    if hi[1] - lo[1] < min_gap or hi[6].strip() == lo[6].strip():
        return None
    prompt = list(hi[4])
    if hi[5]:
        prompt = [{"role": "system", "content": hi[5]}] + prompt
    pref = {"prompt": prompt, "chosen": [{"role": "assistant", "content": hi[6]}],
            "rejected": [{"role": "assistant", "content": lo[6]}], "source": f"{hi[3]}:rating_gap",
            "rating_chosen": hi[1], "rating_rejected": lo[1]}
    pref["id"] = pref_id(pref)
    return pref


def _neg(s: str) -> tuple:
    return tuple(-ord(c) for c in s)


class GapMiner:
    """Bucketed spill of rating-gap candidates; `mine()` yields pairs bucket by bucket."""

    def __init__(self, workdir: Path, min_gap: int = 2, buckets: int = 128):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.min_gap = min_gap
        self.n = buckets
        self.files = [open(self.dir / f"gap-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(buckets)]

    def add(self, key: str, line: str) -> None:
        """`line`: "key<TAB>rating<TAB>json id<TAB>json [key, rating, id, source, prompt, context, answer]"."""
        self.files[int(key[:8], 16) % self.n].write(line + "\n")

    def mine(self) -> Iterator[dict]:
        """One bucket at a time, keeping only the best and the worst answer per prompt (all `best_vs_worst`
        looks at), so memory is O(distinct prompts in one bucket)."""
        try:
            from orjson import loads
        except ImportError:  # pragma: no cover
            loads = json.loads
        for f in self.files:
            f.close()
        for i in range(self.n):
            groups: dict[str, list] = {}  # key -> [best rating, best id, best json, worst ..., count]
            with open(self.dir / f"gap-{i:03d}.jsonl", encoding="utf-8") as f:
                for line in f:
                    key, r, rid, item = line.split("\t", 3)
                    r = int(r)
                    g = groups.get(key)
                    if g is None:
                        groups[key] = [r, rid, item, r, rid, item, 1]
                        continue
                    g[6] += 1
                    if r > g[0] or (r == g[0] and rid < g[1]):  # best: highest rating, then smallest id
                        g[0:3] = [r, rid, item]
                    if r < g[3] or (r == g[3] and rid < g[4]):  # worst: lowest rating, then smallest id
                        g[3:6] = [r, rid, item]
            for key in sorted(groups):
                g = groups[key]
                if g[6] < 2 or g[0] - g[3] < self.min_gap:
                    continue
                pref = best_vs_worst([loads(g[2]), loads(g[5])], self.min_gap)
                if pref is not None:
                    yield pref

    def close(self) -> None:
        for f in self.files:
            if not f.closed:
                f.close()
