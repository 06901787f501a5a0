"""An adapter's champion intervals, as the JSON list the registry keeps on its model version.

MLflow moves an alias by overwriting it; the shell (`flywheel.pipelines.registry`) keeps each version's
"since..until by gate run" intervals in one tag, so a rollback does not erase one. This is that list's
bookkeeping, over the tag's text: the MLflow calls, the lock and the compare-and-set stay in the shell.
"""

from __future__ import annotations

import json


def spans(raw: str | None) -> list[dict]:
    """The intervals recorded in a tag value; [] when there is none or it is not JSON (a hand-edited tag)."""
    try:
        return json.loads(raw or "[]")
    except json.JSONDecodeError:
        return []


def open_interval(raw: str | None, since: str, gate_run: str | None) -> str:
    """The tag value with a new interval that starts at `since` and is still open."""
    return json.dumps(spans(raw) + [{"since": since, "until": None, "gate_run": gate_run}])


def close_interval(raw: str | None, until: str, since: str | None) -> str:
    """The tag value with the open interval closed at `until`; with none open (a champion set by hand, outside
    Flywheel), a closed one from `since` (the version's champion-since tag) is recorded instead."""
    out = spans(raw)
    if out and out[-1].get("until") is None:
        out[-1]["until"] = until
    else:
        out.append({"since": since, "until": until, "gate_run": None})
    return json.dumps(out)
