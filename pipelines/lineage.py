"""One lineage walk, from a model version back to the logs: gate run -> eval run -> train run -> mine run ->
dataset version -> log files. `flywheel publish` writes it into the Modelfile folder's README/lineage.json, the
dashboard draws it; both call `walk`, so they cannot disagree.

Every hop is a tag a stage wrote (names in `tags.py`): a model version carries its gate/eval/train/mine runs and
dataset version (registry.register_adapter), a gate run its `flywheel.input.*`, a train run its mine run. Where a
hop is missing (a stage not run, an older run without the tag) its value is None: a reader is told "unknown",
never a guess. The log files come, in this order, from the loop's `flywheel.loop.sources` tag on the mine run
(byte slices of the real logs), the mine run's `flywheel.input.logs`, or its `manifest.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from flywheel.pipelines import store_read as read
from flywheel.pipelines import tags as T

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 5 * 1024 * 1024


@dataclass
class Lineage:
    registered_model: str | None = None
    version: str | None = None
    model_uri: str | None = None
    base_model: str | None = None
    base_model_sha256: str | None = None
    prompt_variant: str | None = None
    dataset_version: str | None = None
    dataset_path: str | None = None
    logs: list[str] = field(default_factory=list)
    gate_decision: str | None = None
    # the runs themselves (store_read.run_dict), None where the hop is unknown
    gate: dict | None = None
    eval: dict | None = None
    train: dict | None = None
    mine: dict | None = None
    publish: dict | None = None

    def ids(self) -> dict[str, Any]:
        """The flat form `flywheel publish` writes (lineage.json, README rows): run ids instead of runs."""
        out = {k: v for k, v in asdict(self).items() if k not in ("gate", "eval", "train", "mine", "publish")}
        for hop in ("mine", "train", "eval", "gate", "publish"):
            out[f"{hop}_run"] = (getattr(self, hop) or {}).get("run_id")
        out["logs"] = self.logs or None
        return out


def _tag(run: dict | None, name: str) -> str | None:
    return ((run or {}).get("tags") or {}).get(name) or None


def _input(run: dict | None, kind: str) -> str | None:
    return _tag(run, T.input_tag(kind))


def _run_of_uri(uri: str | None) -> str | None:
    """`runs:/<id>/adapter` -> id."""
    return uri[len("runs:/"):].split("/", 1)[0] or None if uri and uri.startswith("runs:/") else None


def walk(tracking: str, start: dict, *, find_publish: bool = False) -> Lineage:
    """Walk back from `start`: a model version (store_read.version_dict: name, version, run_id, tags) or what
    a resolved model knows (run_id, tags, `meta` = its flywheel_adapter.json, `uri`). `find_publish` also looks
    for the publish run that shipped it (the dashboard shows it; publish itself is writing that run)."""
    tags, meta = dict(start.get("tags") or {}), dict(start.get("meta") or {})
    source = read.get_run(tracking, start.get("run_id"))
    stage = _tag(source, T.STAGE)
    gate = read.get_run(tracking, tags.get(T.PROMOTED_BY_GATE_RUN) or tags.get(T.input_tag(T.IN_GATE_RUN)))
    if gate is None and stage == "gate":
        gate = source
    train = read.get_run(tracking, tags.get(T.input_tag(T.IN_TRAIN_RUN)) or meta.get("train_run_id")
                         or _input(gate, T.IN_TRAIN_RUN) or _run_of_uri(_input(gate, T.IN_CANDIDATE)))
    if train is None and stage == "train":
        train = source
    evaluation = read.get_run(tracking, tags.get(T.input_tag(T.IN_EVAL_RUN)) or _input(gate, T.IN_EVAL_RUN))
    mine = read.get_run(tracking, tags.get(T.input_tag(T.IN_MINE_RUN)) or meta.get("mine_run_id")
                        or _input(train, T.IN_MINE_RUN))
    lin = Lineage(
        registered_model=start.get("name"), version=start.get("version"), model_uri=start.get("uri"),
        base_model=tags.get(T.BASE_MODEL) or meta.get("base_model") or _tag(train, T.BASE_MODEL),
        base_model_sha256=(tags.get(T.BASE_MODEL_SHA256) or meta.get("base_model_sha256")
                           or _tag(train, T.BASE_MODEL_SHA256)),
        prompt_variant=tags.get(T.PROMPT_VARIANT) or _tag(gate, T.GATE_VARIANT),
        dataset_version=(tags.get(T.DATASET_VERSION) or meta.get("dataset_version")
                         or _input(train, T.IN_DATASET_VERSION) or _tag(mine, T.DATASET_VERSION)),
        dataset_path=_tag(mine, T.DATASET_PATH), logs=log_sources(tracking, mine),
        gate_decision=_tag(gate, T.GATE_DECISION), gate=gate, eval=evaluation, train=train, mine=mine)
    if find_publish:
        lin.publish = publish_run(tracking, gate, start.get("name"), start.get("version"))
    return lin


def log_sources(tracking: str, mine: dict | None) -> list[str]:
    """The log files a mine run read; slices (`path (bytes a-b)`) when `flywheel run` mined only the new bytes."""
    if mine is None:
        return []
    try:
        sources = json.loads(_tag(mine, T.LOOP_SOURCES) or "[]")
    except json.JSONDecodeError:
        sources = []
    if sources:
        return [_source_label(s) for s in sources if isinstance(s, dict)]
    logs = [x for x in (_input(mine, T.IN_LOGS) or "").split(",") if x]
    if logs:
        return logs
    data = read.download_artifact(tracking, mine["run_id"], MANIFEST, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(data) if data else {}
    except json.JSONDecodeError:
        manifest = {}
    inputs = manifest.get("inputs") if isinstance(manifest, dict) else None
    return [str(i.get("path", i)) if isinstance(i, dict) else str(i) for i in inputs or []]


def _source_label(s: dict) -> str:
    """A loop source: a byte slice of a log file, or a window of an experiment's traces."""
    if "traces" in s:
        after = f"after {s['after_ms']} ms" if s.get("after_ms") is not None else "all"
        return f"{s['traces']} (traces {after}, newest {s.get('newest_ms')} ms)"
    return f"{s['path']} (bytes {s['start']}-{s['end']})"


def publish_run(tracking: str, gate: dict | None, name: str | None, version: str | None) -> dict | None:
    """The publish run of this promotion: the one naming its gate run; failing that, one published from this
    exact version, then one published from `@champion`."""
    if gate is not None:
        found = read.stage_runs(tracking, "publish", f"tags.`{T.input_tag(T.IN_GATE_RUN)}` = "
                                f"'{gate['run_id'].replace(chr(39), '')}'", max_results=1)
        if found:
            return found[0]
    if not name:
        return None
    published = [r for r in read.stage_runs(tracking, "publish", max_results=100)
                 if (_input(r, T.IN_MODEL_URI) or "").startswith(f"models:/{name}")]
    uri = lambda r: _input(r, T.IN_MODEL_URI)  # noqa: E731
    return next((r for r in published if uri(r).endswith(f"/{version}")),
                next((r for r in published if uri(r).endswith("@champion")), None))
