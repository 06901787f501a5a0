"""The MLflow model registry, the Flywheel way: adapters as model versions with lineage, and alias history.

MLflow moves an alias (`champion`) by overwriting it: who held it before, since when, and which decision moved
it are lost. Flywheel keeps that history on the model versions themselves, as tags, so it lives in the same
store as everything else and needs no side database:
- `flywheel.champion_since`  ISO time the version became champion (the latest time, if it came back);
- `flywheel.champion_until`  ISO time it lost the alias (absent while it holds it);
- `flywheel.promoted_by_gate_run`  the `flywheel/gate` run whose pass moved the alias;
- `flywheel.promotions`  every "since..until by gate run" interval, JSON, so a rollback does not erase one.
`flywheel history` prints it.

A promotion is several registry writes, and the process or the server can die between any two. The alias move is
the commit point: a new version carries only `flywheel.promotion_pending` (its since, gate run and predecessor)
until the alias points at it, and the history tags are written after. The next promotion of the model repairs
what a dead one left (under the same guard): a pending version holding the alias gets its history written, any
other pending version is deleted (it was never champion). `history` reads a pending champion from its pending tag,
so no state in between shows an alias without its history entry or a history entry without the alias.

Model versions point at the train run's `adapter/` artifact (source = its artifact URI) and carry the lineage
tags: dataset version, train/eval/gate run, base model and its hash.

Also here: `resolve_model`, which turns whatever the user typed (a train run id, `runs:/…`, `models:/…@alias`,
`models:/…/3`, a local adapter dir) into a local adapter directory plus what is known about it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer

from flywheel.foundation import procs
from flywheel.foundation.errors import FlywheelError, InputError
from flywheel.foundation.io import read_json
from flywheel.pipelines import tags as T
from flywheel.training.promotions import close_interval, open_interval, spans

CHAMPION = "champion"
TAG_SINCE = T.CHAMPION_SINCE
TAG_UNTIL = T.CHAMPION_UNTIL
TAG_BY_GATE = T.PROMOTED_BY_GATE_RUN
TAG_PROMOTIONS = T.PROMOTIONS
TAG_PENDING = T.PROMOTION_PENDING
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
META_FILE = "flywheel_adapter.json"


def now_iso() -> str:
    # Microseconds: two promotions within one second (a quick rollback) must still sort in the order they happened.
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass
class ResolvedModel:
    """A candidate or champion, located: a local adapter dir and everything we know about where it came from."""

    uri: str                      # what the user gave, normalised (`runs:/<id>/adapter`, `models:/n/3`, a path)
    adapter_dir: Path
    meta: dict = field(default_factory=dict)  # flywheel_adapter.json
    name: str | None = None       # registered model name, when it came from the registry
    version: str | None = None
    run_id: str | None = None     # the train run
    tags: dict = field(default_factory=dict)  # model version tags

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}" if self.version else self.uri


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _download(uri: str, what: str) -> Path:
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as e:  # MlflowException, OSError: one line, naming the URI
        raise InputError(f"{what} {uri}: cannot read its artifacts ({str(e).splitlines()[0][:200]})") from None


def _read_meta(adapter_dir: Path, what: str) -> dict:
    if not (adapter_dir / "adapter_config.json").exists():
        raise InputError(f"{what}: {adapter_dir} is not a LoRA adapter directory (no adapter_config.json)")
    mp = adapter_dir / META_FILE
    if not mp.exists():
        return {}
    return read_json(mp)


def resolve_model(ref: str, what: str = "model") -> ResolvedModel:
    """Local dir | 32-hex train run id | runs:/<id>[/path] | models:/<name>/<version> | models:/<name>@<alias>.

    Needs tracking set up (`flywheel.pipelines.tracking.setup`) for anything but a local dir. Raises InputError naming
    `what` and the reference when it cannot be read: the gate turns that into exit 2, never a pass.
    """
    p = Path(ref).expanduser()
    if not ref.startswith(("runs:/", "models:/")) and p.exists():
        d = p if (p / "adapter_config.json").exists() else p / "adapter"
        meta = _read_meta(d, what)
        return ResolvedModel(uri=str(d.resolve()), adapter_dir=d.resolve(), meta=meta,
                             run_id=meta.get("train_run_id"))
    if RUN_ID.match(ref):
        ref = f"runs:/{ref}/adapter"
    if ref.startswith("runs:/"):
        run_id, _, sub = ref[len("runs:/"):].strip("/").partition("/")
        ref = f"runs:/{run_id}/{sub or 'adapter'}"  # a bare run means its adapter
        d = _download(ref, what)
        if not (d / "adapter_config.json").exists() and (d / "adapter" / "adapter_config.json").exists():
            d = d / "adapter"
        return ResolvedModel(uri=ref, adapter_dir=d, meta=_read_meta(d, what), run_id=run_id)
    if ref.startswith("models:/"):
        mv = get_version(ref, what)
        d = _download(mv.source, what)
        return ResolvedModel(uri=ref, adapter_dir=d, meta=_read_meta(d, what), name=mv.name, version=str(mv.version),
                             run_id=mv.run_id, tags=dict(mv.tags or {}))
    raise InputError(f"{what} {ref!r}: not a local adapter dir, a run id, runs:/… or models:/…")


def get_version(ref: str, what: str = "model"):
    """`models:/name@alias` or `models:/name/3` -> MLflow ModelVersion, or InputError."""
    body = ref[len("models:/"):]
    client = _client()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = body.partition("/")
        if not version.isdigit():
            raise InputError(f"{what} {ref!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
        return client.get_model_version(name, version)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{what} {ref}: not in the registry ({str(e).splitlines()[0][:200]})") from None


def champion(name: str):
    """The ModelVersion holding `champion`, or None when there is none (or no such registered model)."""
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        code = getattr(e, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND") or "not found" in str(e).lower():
            return None
        raise


class ChampionMoved(FlywheelError):
    """`@champion` no longer points where the gate's evaluation says it does: promoting would replace a champion
    the candidate was never compared with."""


UNCHECKED = object()  # `expected` for a hand-made move (rollback): no compare, still under the registry guard
TAG_LEASE = T.PROMOTION_LEASE  # registered-model tag: the optimistic lease/sequence on a server
LEASE_SECONDS = 120.0  # a lease older than this is abandoned (its holder died) and may be taken over
SETTLE_SECONDS = 1.0  # how long a new lease must survive before it counts (covers a racing writer's round trip)
LOCK_TIMEOUT_S = 120.0


def _label(version: str | None) -> str:
    return f"v{version}" if version is not None else "no champion (the base model)"


def _lock_file(name: str) -> Path | None:
    """The lock next to a local store (sqlite db or file store); None for a server, where no local file can
    exclude another machine."""
    import mlflow

    uri = mlflow.get_registry_uri() or mlflow.get_tracking_uri()
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent / f".registry-{safe}.lock"
    if uri.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return Path(url2pathname(urlparse(uri).path)) / f".registry-{safe}.lock"
    if "://" not in uri:  # a plain path: a file store
        return Path(uri) / f".registry-{safe}.lock"
    return None


class _FileGuard:
    """Embedded store: every registry write of one model happens under one OS file lock, so a read of the alias,
    the version creation, the history tags and the alias move are one critical section across processes."""

    def __init__(self, path: Path):
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.lock = path, FileLock(str(path), timeout=LOCK_TIMEOUT_S)

    def __enter__(self):
        from filelock import Timeout

        try:
            self.lock.acquire()
        except Timeout:
            raise FlywheelError(f"registry lock {self.path}: still held after {LOCK_TIMEOUT_S:g} s by another "
                                "promotion") from None
        return self

    def __exit__(self, *exc):
        self.lock.release()

    def verify(self) -> None:  # the lock cannot be lost while held
        return None


class _LeaseGuard:
    """Remote server: MLflow's REST API has no lock and no conditional write, so this is optimistic. The lease is a
    registered-model tag {owner, seq, expires}: take it only when it is free or expired, wait SETTLE_SECONDS, and
    proceed only if it still names us; re-check it (and the alias) right before moving the alias. Two promotions
    whose lease writes land within one settle window both see the later writer and only it proceeds. What it
    cannot exclude: a writer whose read-to-write round trip is longer than the settle window, or a client that
    moves the alias without Flywheel. `seq` counts promotions, so a reader can tell that something happened."""

    def __init__(self, name: str):
        import uuid

        self.name, self.token, self.seq = name, uuid.uuid4().hex, 0

    def _read(self) -> dict:
        raw = (_client().get_registered_model(self.name).tags or {}).get(TAG_LEASE)
        try:
            return json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            return {}

    def _write(self, value: dict) -> None:
        _client().set_registered_model_tag(self.name, TAG_LEASE, json.dumps(value))

    def __enter__(self):
        import time

        _ensure_registered_model(self.name)
        cur = self._read()
        if cur.get("owner") and cur.get("expires", 0) > time.time() and not _holder_gone(cur):
            raise ChampionMoved(f"another promotion of {self.name} holds the registry lease (seq {cur.get('seq')}); "
                                "the champion is moving")
        self.seq = int(cur.get("seq") or 0) + 1
        self._write({"owner": self.token, "seq": self.seq, "expires": time.time() + LEASE_SECONDS,
                     **_holder()})
        _HELD.add(self.token)
        try:
            time.sleep(SETTLE_SECONDS)
            self.verify()
        except BaseException:
            _HELD.discard(self.token)
            raise
        return self

    def verify(self) -> None:
        import time

        cur = self._read()
        if cur.get("owner") != self.token or cur.get("seq") != self.seq or cur.get("expires", 0) <= time.time():
            raise ChampionMoved(f"a concurrent promotion of {self.name} took the registry lease (seq {cur.get('seq')})")

    def __exit__(self, *exc):
        _HELD.discard(self.token)
        try:
            if self._read().get("owner") == self.token:
                self._write({"owner": None, "seq": self.seq, "expires": 0})
        except Exception:  # noqa: BLE001 - an unreleased lease expires by itself
            pass


def _holder() -> dict:
    """Who takes the lease: on this machine, a lease whose process is gone (killed, or its server died under it and
    it exited) is taken over at once instead of blocking every promotion for LEASE_SECONDS."""
    import os
    import socket

    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": procs.started_at(os.getpid())}


_HELD: set[str] = set()  # lease tokens this process holds right now


def _holder_gone(lease: dict) -> bool:
    import socket

    if lease.get("host") != socket.gethostname() or not lease.get("pid"):
        return False  # another machine's process: only the expiry can tell
    if lease == {**lease, **_holder()}:  # this process: gone unless a promotion here still holds it
        return lease.get("owner") not in _HELD
    started = procs.started_at(lease["pid"])
    return started is None or abs(started - lease.get("pid_started", 0)) > procs.SAME_START_S


def registry_guard(name: str):
    """The critical section for writes to `name`: a file lock on a local store, the optimistic lease on a server."""
    path = _lock_file(name)
    return _FileGuard(path) if path is not None else _LeaseGuard(name)


def _ensure_registered_model(name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        _client().create_registered_model(name, description="LoRA adapters promoted by `flywheel gate`")
    except MlflowException as e:
        if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise


def _version_tags(model: ResolvedModel, tags: dict[str, Any] | None) -> dict[str, str]:
    meta = model.meta
    all_tags = {
        T.BASE_MODEL: meta.get("base_model"),
        T.BASE_MODEL_SHA256: meta.get("base_model_sha256"),
        T.DATASET_VERSION: meta.get("dataset_version"),
        T.input_tag(T.IN_MINE_RUN): meta.get("mine_run_id"),
        T.input_tag(T.IN_TRAIN_RUN): meta.get("train_run_id") or model.run_id,
        **(tags or {}),
    }
    return {k: str(v) for k, v in all_tags.items() if v is not None}


def _create_version(name: str, model: ResolvedModel, tags: dict[str, str], description: str | None) -> str:
    client = _client()
    _ensure_registered_model(name)
    source = model.uri
    if model.run_id and model.uri.startswith("runs:/"):
        source = client.get_run(model.run_id).info.artifact_uri.rstrip("/") + "/" + model.uri.split("/", 2)[2]
    elif not model.uri.startswith(("runs:/", "models:/")):
        source = model.adapter_dir.resolve().as_uri()
    elif model.uri.startswith("models:/"):
        source = get_version(model.uri).source
    mv = client.create_model_version(name, source=source, run_id=model.run_id, tags=tags, description=description)
    return str(mv.version)


def register_adapter(name: str, model: ResolvedModel, *, tags: dict[str, Any] | None = None,
                     description: str | None = None) -> str:
    """New model version of `name` pointing at the adapter (its train run's artifact when known). -> version."""
    path = _lock_file(name)
    if path is None:  # a server numbers versions in its own transaction
        return _create_version(name, model, _version_tags(model, tags), description)
    with _FileGuard(path):
        return _create_version(name, model, _version_tags(model, tags), description)


def _check_expected(name: str, expected: Any) -> Any:
    """The current champion, after checking it is `expected` (a version string, or None for "no champion")."""
    prev = champion(name)
    now = str(prev.version) if prev is not None else None
    if expected is not UNCHECKED and now != (str(expected) if expected is not None else None):
        raise ChampionMoved(f"champion moved: the gate evaluated against {_label(expected)} of {name}, but "
                            f"@champion is {_label(now)} now; re-run the gate against it")
    return prev


def _move(name: str, version: str, prev, when: str, guard, *, pending: dict | None = None) -> dict:
    """Under the guard: the alias moves to `version` and the previous holder's interval closes. `pending`: the
    promotion record of a version created for this move (committed once the alias holds it)."""
    client = _client()
    guard.verify()
    client.set_registered_model_alias(name, CHAMPION, version)
    now = champion(name)
    if now is None or str(now.version) != str(version):  # a server-side writer outside Flywheel's lease
        if pending is None:
            _append_interval(client, name, version, until=when)
        raise ChampionMoved(f"champion moved: @champion of {name} became {_label(now and str(now.version))} while "
                            f"v{version} was being promoted")
    if pending is not None:
        _commit(client, name, version, pending)
    elif prev is not None:
        _close(client, name, prev.version, when)
    return {"previous": str(prev.version) if prev is not None else None, "version": str(version), "since": when,
            **({"created": True} if pending is not None else {})}


def _close(client, name: str, version: str, when: str) -> None:
    client.set_model_version_tag(name, version, TAG_UNTIL, when)
    _append_interval(client, name, version, until=when)


def _commit(client, name: str, version: str, pending: dict) -> None:
    """After the alias moved to a pending version: its history tags, then the predecessor's interval closes."""
    client.set_model_version_tag(name, version, TAG_SINCE, pending["since"])
    client.set_model_version_tag(name, version, TAG_BY_GATE, pending.get("gate_run") or "")
    client.set_model_version_tag(name, version, TAG_PROMOTIONS,
                                 open_interval(None, pending["since"], pending.get("gate_run")))
    client.delete_model_version_tag(name, version, TAG_PENDING)
    if pending.get("previous") is not None:
        prev = client.get_model_version(name, pending["previous"])
        if TAG_UNTIL not in (prev.tags or {}):  # not closed yet (a repair may run twice)
            _close(client, name, pending["previous"], pending["since"])


def _repair(name: str) -> None:
    """Under the guard: finish or undo what a promotion that died part-way left (see the module doc)."""
    client = _client()
    current = champion(name)
    for mv in client.search_model_versions(f"name = '{name}'"):
        raw = (mv.tags or {}).get(TAG_PENDING)
        if raw is None:
            continue
        if current is not None and str(current.version) == str(mv.version):
            _commit(client, name, str(mv.version), json.loads(raw))
        else:
            client.delete_model_version(name, mv.version)


def promote_new(name: str, model: ResolvedModel, *, expected: Any, gate_run_id: str | None,
                tags: dict[str, Any] | None = None, description: str | None = None) -> dict:
    """Compare-and-set promotion of a new version: only if `@champion` is still `expected` (a version, or None
    for "no champion"), register `model` and move the alias, all under `registry_guard`. The version is created
    after the check and deleted again if the move fails, so a lost race leaves no orphan version.
    Raises ChampionMoved. Returns {previous, version, since, created}."""
    with registry_guard(name) as guard:
        _repair(name)
        prev = _check_expected(name, expected)
        when = now_iso()
        vtags = _version_tags(model, tags)
        pending = {"since": when, "gate_run": gate_run_id,
                   "previous": str(prev.version) if prev is not None else None}
        vtags[TAG_PENDING] = json.dumps(pending)
        version = _create_version(name, model, vtags, description)
        try:
            return _move(name, version, prev, when, guard, pending=pending)
        except BaseException:
            try:
                cur = champion(name)
                if cur is None or str(cur.version) != version:
                    _client().delete_model_version(name, version)
            except Exception:  # noqa: BLE001 - the store is gone: the next promotion's _repair undoes it
                pass
            raise


def promote(name: str, version: str, gate_run_id: str | None, *, expected: Any = UNCHECKED) -> dict:
    """Move `champion` to an existing `version` (a rollback), closing the previous holder's interval; with
    `expected`, only if the alias still points there. Returns {previous, version, since}."""
    client = _client()
    with registry_guard(name) as guard:
        _repair(name)
        prev = _check_expected(name, expected)
        when = now_iso()
        if prev is not None and str(prev.version) == str(version):
            return {"previous": str(prev.version), "version": str(version), "since": prev.tags.get(TAG_SINCE),
                    "unchanged": True}
        client.set_model_version_tag(name, version, TAG_SINCE, when)
        client.set_model_version_tag(name, version, TAG_BY_GATE, gate_run_id or "")
        try:
            client.delete_model_version_tag(name, version, TAG_UNTIL)  # it may have been champion before
        except Exception:
            pass
        _append_interval(client, name, version, since=when, gate_run=gate_run_id)
        return _move(name, str(version), prev, when, guard)


def _append_interval(client, name: str, version: str, *, since: str | None = None, until: str | None = None,
                     gate_run: str | None = None) -> None:
    """Open (`since`) or close (`until`) the version's champion interval in its promotions tag."""
    tags = client.get_model_version(name, version).tags or {}
    raw = tags.get(TAG_PROMOTIONS)
    value = open_interval(raw, since, gate_run) if since is not None else close_interval(raw, until,
                                                                                          tags.get(TAG_SINCE))
    client.set_model_version_tag(name, version, TAG_PROMOTIONS, value)


def history(name: str) -> list[dict]:
    """Every champion interval of `name`, oldest first: {version, since, until, gate_run, current, lineage...}."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as e:
        raise InputError(f"registered model {name!r}: {str(e).splitlines()[0][:200]}") from None
    current = champion(name)
    rows = []
    for mv in versions:
        tags = dict(mv.tags or {})
        intervals = spans(tags.get(TAG_PROMOTIONS))
        if not intervals and tags.get(TAG_SINCE):
            intervals = [{"since": tags[TAG_SINCE], "until": tags.get(TAG_UNTIL), "gate_run": tags.get(TAG_BY_GATE)}]
        if tags.get(TAG_PENDING):  # begun, not committed: in the history only once it holds the alias
            is_champion = current is not None and str(current.version) == str(mv.version)
            intervals = [{**json.loads(tags[TAG_PENDING]), "until": None}] if is_champion else []
        for s in intervals:
            rows.append({"version": str(mv.version), "since": s.get("since"), "until": s.get("until"),
                         "gate_run": s.get("gate_run"),
                         "current": current is not None and str(current.version) == str(mv.version)
                         and s.get("until") is None,
                         "dataset_version": tags.get(T.DATASET_VERSION),
                         "train_run": tags.get(T.input_tag(T.IN_TRAIN_RUN)),
                         "eval_run": tags.get(T.input_tag(T.IN_EVAL_RUN)),
                         "base_model": tags.get(T.BASE_MODEL)})
    rows.sort(key=lambda r: (r["since"] or "", int(r["version"])))
    return rows


def default_model_name(config: Path) -> str:
    """The model `flywheel run --config <config>` registers (its `model_name`), so both name the same model."""
    from flywheel.pipelines.loop import ROOT, LoopConfig
    from flywheel.pipelines.config import load_config

    path = config if config.exists() or config.is_absolute() else ROOT / config
    if not path.exists():
        raise InputError(f"{config}: no such file; name the model: flywheel history MODEL_NAME")
    return load_config(LoopConfig, path).model_name


def history_command(app: typer.Typer) -> None:
    """Adds `flywheel history` (registered by pipelines/loop.py, next to `flywheel run`)."""

    @app.command("history")
    def history_cmd(
        name: str = typer.Argument(None, help="registered model name (default: model_name of --config)"),
        config: Path = typer.Option(Path("configs/flywheel.yaml"), "--config", "-c",
                                    help="the loop config whose model_name is the default"),
        as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
        tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store (default: embedded)"),
    ) -> None:
        """Who held `champion` when, and which gate run moved it."""
        from flywheel.pipelines import tracking

        name = name or default_model_name(config)
        tracking.setup(tracking_uri)
        rows = history(name)
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        if not rows:
            typer.echo(f"{name}: no champion yet (nothing promoted by `flywheel gate --promote`)")
            return
        table = Table(title=f"champion history of {name}")
        for col in ("version", "since (UTC)", "until (UTC)", "gate run", "dataset", "train run"):
            table.add_column(col, no_wrap=True)

        def t(iso):  # 2026-11-26T15:47:02+00:00 -> 2026-11-26 15:47
            return iso[:16].replace("T", " ") if iso else "-"

        for r in rows:
            table.add_row(r["version"] + (" (current)" if r["current"] else ""), t(r["since"]), t(r["until"]),
                          (r["gate_run"] or "-")[:8], (r["dataset_version"] or "-")[:8], (r["train_run"] or "-")[:8])
        Console().print(table)
