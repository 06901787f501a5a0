"""One record per `id` in a dataset: superseded conversation versions and ids reused across files.

Chat logs name a record by its conversation id, and two cases put one id on several kept records:
- a conversation logged once per turn: every entry repeats the history and adds a turn. These are versions of
  one conversation, and the **longest version wins (most turns; on a tie, the latest in input order)**. Within one
  file, records sharing an id are versions; across files they are when one's turns extend the other's (a
  conversation continued in the next rotated log). The others are filtered as `superseded`.
- two log files reusing an id for different conversations: each keeps its record, and the id becomes
  `<first 8 hex of the file's sha256>:<id>`, so the dataset never holds one id twice (eval and gate refuse it).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple


class Version(NamedTuple):
    seq: int  # input order
    file: int  # input file index
    chain: str  # turn_chain of its turns


def turn_chain(messages: list[dict]) -> str:
    """Space-separated running hashes of the turns: entry k hashes turns 0..k. Conversation A is an earlier
    version of B (logged once per turn, the history growing) when A's last entry is B's entry at A's length."""
    h = hashlib.blake2b(digest_size=8)
    out = []
    for m in messages:
        h.update(f"{m['role']}\x1f{m['content']}\x1e".encode("utf-8"))
        out.append(h.copy().hexdigest())
    return " ".join(out)


def _extends(longer: Version, shorter: Version) -> bool:
    a, b = longer.chain.split(" "), shorter.chain.split(" ")
    return len(a) >= len(b) and a[len(b) - 1] == b[-1]


def _latest_longest(vs: list[Version]) -> Version:
    return max(vs, key=lambda v: (len(v.chain.split(" ")), v.seq))


def resolve(rec_id: str, versions: list[Version], file_sha: list[str]) -> tuple[set[int], dict[int, str]]:
    """For the kept records sharing `rec_id`: (seqs superseded, {file index: new id} for ids reused across files)."""
    by_file: dict[int, list[Version]] = {}
    for v in versions:
        by_file.setdefault(v.file, []).append(v)
    heads = [_latest_longest(vs) for vs in by_file.values()]
    superseded = {v.seq for v in versions} - {h.seq for h in heads}
    # across files: union the heads whose turns extend one another (few files: pairwise is fine)
    comps: list[list[Version]] = []
    for h in sorted(heads, key=lambda v: (-len(v.chain.split(" ")), -v.seq)):
        for comp in comps:
            if _extends(comp[0], h):
                comp.append(h)
                superseded.add(h.seq)
                break
        else:
            comps.append([h])
    renamed = {} if len(comps) == 1 else {c[0].file: f"{file_sha[c[0].file][:8]}:{rec_id}" for c in comps}
    return superseded, renamed
