"""The Ray engine of `flywheel mine` (`engine: ray`): the local engine's dataset, byte for byte, from Ray Data stages.

    mine(inputs, out, cfg, progress=None) -> Mined

How the field stages distributed MinHash dedupe, and what is kept here:
- datatrove (`pipeline/dedup/minhash.py`): signatures -> per-bucket sorted files of band hashes -> one process
  reads the bucket collisions and union-finds them (clusters = connected components, no Jaccard check) -> filter.
- NeMo Curator (`stages/deduplication/fuzzy/`): MinHash -> LSH band shuffle -> bucket edges -> connected
  components (GPU) -> duplicate ids -> removal.
Kept: the signature stage, the LSH band shuffle (group by band key) that turns buckets into candidate pairs, and
one clustering step on the driver over the pairs alone (as datatrove's cluster stage). Not kept: connected
components. The local engine's clusters are not components (`dedupe.Deduper`): a new text joins the *most similar
earlier representative* (estimated Jaccard on the signatures >= threshold, ties to the earliest), else founds a
cluster; exact copies join their first copy's cluster. Components would merge a chain a~b~c that the local engine
keeps apart when a and c are not similar. Input order is known here (every event carries `ord`), so the band stage
verifies each pair's Jaccard, as the local engine verifies its LSH candidates, and the driver replays the same rule
over the verified pairs: identical clusters, winners, files and manifest `version`.

Stages:
1. `curate_block` (map_batches over input blocks: a line range of a JSONL file, or a whole CSV/Parquet/oasst1
   file): parse -> curate -> redact -> MinHash, the local engine's `work`; each event a row ordered by `ord`.
2. exact groups: group by the normalised-text key -> its first occurrence (the only member the local engine
   compares with representatives) with its signature.
3. bands: each first occurrence -> its LSH band keys; group by band key -> pairs (earlier, later) whose estimated
   Jaccard >= threshold.
4. driver: `plan_near` replays the rule over the pairs -> {key: key of the representative it joins}.
5. write: the events reach the driver in ROUTE_ROWS batches, in order, through the local engine's `Router` with a
   `PlannedDeduper` (the local `Deduper`, near decisions taken from step 4; winner = best rating, then earliest),
   then the local `write_splits`, `write_preferences`, `build_manifest` and `finish` inside `atomic_dir`.
With an earlier batches' index (`prior`, the loop's), its keys go to the workers in one `ray.put`: a candidate
whose text an earlier batch kept is no node (it joins their cluster as an exact copy); its signatures join the
nodes of step 3 with negative `ord` (always the earlier side, in the index's order as the local engine's cluster
order), so a near copy joins one of them and is dropped as `duplicate_earlier_batch`; the returned index is the
prior plus this batch's keys and representatives, as the local engine's.
The driver holds what the local engine holds (a key per distinct text, a row per cluster) plus the near pairs;
the records stay in Ray's object store and pass the driver a batch at a time on their way into the files.
A task whose worker dies runs again (Ray Data's default `max_retries=-1` for system failures;
user exceptions are not retried); an input error comes back as a row and is raised as the
local engine's one-line `InputError` naming file and line.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from flywheel.foundation.errors import InputError
from flywheel.foundation.io import atomic_dir
from flywheel.mining import engine, readers
from flywheel.mining.config import MineConfig, RayConfig
from flywheel.mining.curate import Cand, Filtered, PrefEvent, Reject
from flywheel.mining.dedupe import DedupeIndex, Deduper, lsh_bands

# A test hook: while the file this names exists, the first task to rename it away kills its own worker process
# (SIGKILL), so a test can show that Ray's retry of the task gives the same output.
KILL_ONCE_ENV = "FLYWHEEL_TEST_RAY_KILL_ONCE"
_POS_BITS, _BLOCK_BITS = 24, 20  # ord = file << 44 | block << 24 | position in the block
# A worker holds its block's events ~10x the block's input bytes (measured: 125 MB blocks, 1.5 GB workers), so
# the default block count grows with the input; the driver routes the events in batches of ROUTE_ROWS, not blocks.
MAX_BLOCK_BYTES = 32 << 20
ROUTE_ROWS = 8192

COLUMNS = ("ord", "kind", "line", "key", "sig", "rating", "rid", "grp", "record", "gap_key", "gap_line",
           "reason", "raw", "pref_id", "pref_json")


# ------------------------------------------------------------------------------------------ 1. curate the blocks
def plan_blocks(plan: list[engine.InputFile], n_blocks: int, max_bytes: int = 0) -> list[dict]:
    """Ray tasks: line ranges of about total/n_blocks bytes (at most `max_bytes` when given) of the line-based
    files; CSV, Parquet and oasst1 (threads need the whole file) are one block each."""
    line_files = [(i, p) for i, p in enumerate(plan) if p.fmt != "empty" and _by_lines(p)]
    total = sum(p.path.stat().st_size for _, p in line_files)
    block_bytes = max(1, total // max(1, n_blocks))
    if max_bytes:
        block_bytes = min(block_bytes, max_bytes)
    tasks = []
    for i, p in enumerate(plan):
        if p.fmt == "empty":
            continue
        spans = readers.line_blocks(p.path, block_bytes) if _by_lines(p) else [(0, 0, -1)]
        if len(spans) >= 1 << _BLOCK_BITS:
            raise InputError(f"{p.path}: more than {1 << _BLOCK_BITS} blocks; use fewer `ray.blocks`")
        tasks += [{"file": i, "block": j, "path": str(p.path), "fmt": p.fmt, "start": a, "first": f, "lines": n}
                  for j, (a, f, n) in enumerate(spans)]
    return tasks


def _by_lines(p: engine.InputFile) -> bool:
    return p.path.suffix.lower() not in (".csv", ".parquet") and p.fmt != "oasst1"


def _maybe_die_once() -> None:
    armed = os.environ.get(KILL_ONCE_ENV)
    if armed:
        try:
            os.rename(armed, armed + ".fired")  # one worker wins the rename, and dies
        except FileNotFoundError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


def block_events(task: dict, cfg: MineConfig, ratings: dict | None = None) -> tuple[list[tuple], Counter]:
    """The local engine's `work` over one block, in input order. `ratings`: the file's rating lines (a chat log
    may rate a conversation on a later line, in another block), as the local engine reads them."""
    s = engine.settings(cfg)
    path = Path(task["path"])
    if task["lines"] < 0:
        tasks: Iterator[tuple] = engine.file_tasks(path, task["fmt"], cfg, s, lambda n: None)
    else:
        raw = readers.iter_raw_lines(path, cfg.max_line_bytes, task["start"], task["first"], task["lines"])
        tasks = engine.line_tasks(raw, task["fmt"], s, ratings or {}, cfg.batch_size)
    events: list[tuple] = []
    pii: Counter = Counter()
    for t in tasks:
        ev, counts = engine.work(t)
        events += ev
        pii.update(counts)
    return events, pii


def _row(o: int, ev: tuple) -> dict:
    r = {"ord": o, "kind": ev[0], "line": ev[1], "key": b"", "sig": b"", "rating": 0, "rid": "", "grp": "",
         "record": "", "gap_key": "", "gap_line": "", "reason": "", "raw": "", "pref_id": "", "pref_json": ""}
    if isinstance(ev, Cand):
        r.update(key=ev.key, sig=b"" if ev.sig is None else ev.sig.tobytes(), rating=ev.rating, rid=ev.id,
                 grp=ev.group, record=ev.record)
    elif isinstance(ev, PrefEvent):
        r.update(pref_id=ev.pref_id, pref_json=ev.pref_json)
    elif isinstance(ev, Reject):
        r.update(reason=ev.reason, raw=ev.raw)
    else:
        r["reason"] = ev.reason
    gap = getattr(ev, "gap", None)
    if gap is not None:
        r.update(gap_key=gap[0], gap_line=gap[1])
    return r


def curate_block(batch: dict, cfg_json: str, ratings: dict[int, Any] | None = None) -> Any:
    """map_batches function (one task row per call): the block's events as rows, then one "block" row with its
    PII counts and the worker's pid and peak RSS; an input error becomes one "error" row. `ratings`: {file index:
    ObjectRef of its rating lines}, put once per file."""
    import pyarrow as pa
    import ray

    _maybe_die_once()
    cfg = MineConfig.model_validate_json(cfg_json)
    rows: list[dict] = []
    for k in range(len(batch["file"])):
        task = {key: (v[k].item() if hasattr(v[k], "item") else v[k]) for key, v in batch.items()}
        base = task["file"] << (_BLOCK_BITS + _POS_BITS) | task["block"] << _POS_BITS
        try:
            ref = (ratings or {}).get(task["file"])
            events, pii = block_events(task, cfg, ray.get(ref) if ref is not None else None)
        except InputError as e:
            rows.append(_row(base, Filtered("error", 0, str(e))))
            continue
        if len(events) >= 1 << _POS_BITS:
            raise RuntimeError(f"{task['path']}: block {task['block']} holds too many events; use more blocks")
        rows += [_row(base + n, ev) for n, ev in enumerate(events)]
        stats = {"pii": dict(pii), "pid": os.getpid(), "node": os.uname().nodename,
                 "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        rows.append(_row(base + (1 << _POS_BITS) - 1, Filtered("block", 0, json.dumps(stats))))
    return pa.Table.from_pylist(rows, schema=_schema())


def _schema():
    import pyarrow as pa

    types = {"ord": pa.int64(), "line": pa.int64(), "rating": pa.int64(), "key": pa.binary(), "sig": pa.binary()}
    return pa.schema([(c, types.get(c, pa.string())) for c in COLUMNS])


# ------------------------------------------------------------------------------------------ 2-3. exact groups, bands
def first_occurrence(group: Any) -> Any:
    """One exact-key group -> its earliest member (key, ord, sig)."""
    import pyarrow.compute as pc

    return group.take([pc.index(group["ord"], pc.min(group["ord"])).as_py()])


def band_rows(nodes: Any, bands: int, rows: int) -> Any:
    """Each node once per band: "band index + the band's slice of the signature" is the bucket key."""
    import pyarrow as pa

    out: dict[str, list] = {"bucket": [], "ord": [], "key": [], "sig": []}
    width = rows * 4  # uint32
    for o, k, s in zip(nodes["ord"].to_pylist(), nodes["key"].to_pylist(), nodes["sig"].to_pylist()):
        for b in range(bands):
            out["bucket"].append(b.to_bytes(2, "big") + s[b * width:(b + 1) * width])
            out["ord"].append(o)
            out["key"].append(k)
            out["sig"].append(s)
    return pa.table(out, schema=pa.schema([("bucket", pa.binary()), ("ord", pa.int64()), ("key", pa.binary()),
                                           ("sig", pa.binary())]))


def bucket_pairs(group: Any, threshold: float) -> Any:
    """One LSH bucket -> the pairs (later, earlier) whose estimated Jaccard (share of equal signature values, the
    local engine's test, in the same float arithmetic) is >= threshold. Earlier batches' representatives
    (negative `ord`) are only ever the earlier side: their clusters exist before this batch's first record."""
    import numpy as np
    import pyarrow as pa

    schema = pa.schema([("u_ord", pa.int64()), ("u_key", pa.binary()), ("v_ord", pa.int64()),
                        ("v_key", pa.binary()), ("j", pa.float64())])
    out: dict[str, list] = {n: [] for n in schema.names}
    if group.num_rows > 1:
        g = group.sort_by("ord")
        ords, keys = g["ord"].to_pylist(), g["key"].to_pylist()
        sigs = np.stack([np.frombuffer(s, dtype=np.uint32) for s in g["sig"].to_pylist()])
        for a in range(1, len(ords)):
            if ords[a] < 0:
                continue
            js = (sigs[:a] == sigs[a]).mean(axis=1)
            for v in np.nonzero(js >= threshold)[0]:
                out["u_ord"].append(ords[a])
                out["u_key"].append(keys[a])
                out["v_ord"].append(ords[v])
                out["v_key"].append(keys[v])
                out["j"].append(float(js[v]))
    return pa.table(out, schema=schema)


def prior_key(n: int) -> bytes:
    """The node key of the prior index's n-th signature: 14 bytes, so never a 12-byte text key."""
    return b"prior:" + n.to_bytes(8, "big")


def prior_nodes(prior: DedupeIndex, n_blocks: int) -> list[Any]:
    """The earlier batches' representatives as band-stage nodes, in blocks: ord -len..-1 keeps their order (the
    local engine's cluster order, which breaks Jaccard ties) and puts them before every record of this batch."""
    import numpy as np
    import pyarrow as pa

    n, step = len(prior.sigs), max(1, -(-len(prior.sigs) // max(1, n_blocks)))
    return [pa.table({"key": pa.array([prior_key(i) for i in range(a, min(n, a + step))], pa.binary()),
                      "ord": pa.array(range(a - n, min(n, a + step) - n), pa.int64()),
                      "sig": pa.array([np.asarray(s, dtype=np.uint32).tobytes() for s in prior.sigs[a:a + step]],
                                      pa.binary())})
            for a in range(0, n, step)]


def new_candidates(t: Any, prior_keys: Any) -> Any:
    """The candidates' (key, ord, sig), less those whose text an earlier batch kept: those join the earlier
    batches' cluster as exact copies and never enter the LSH. `prior_keys`: an ObjectRef (put once) of the keys."""
    import pyarrow.compute as pc

    t = t.filter(pc.equal(t["kind"], "cand")).select(["key", "ord", "sig"])
    if prior_keys is None:
        return t
    import ray

    return t.filter(pc.invert(pc.is_in(t["key"], value_set=ray.get(prior_keys))))


# ------------------------------------------------------------------------------------------ 4. the clusters
def plan_near(pairs: Iterator[dict]) -> dict[bytes, bytes]:
    """The local engine's rule over the verified pairs: in input order, a text joins its most similar earlier
    representative (ties: the earliest); a text with no such pair is a representative."""
    by_u: dict[int, tuple[bytes, set]] = {}
    for p in pairs:
        by_u.setdefault(p["u_ord"], (p["u_key"], set()))[1].add((-p["j"], p["v_ord"], p["v_key"]))
    rep_of: dict[bytes, bytes] = {}
    for u in sorted(by_u):
        u_key, cands = by_u[u]
        live = [c for c in cands if c[2] not in rep_of]
        if live:
            rep_of[u_key] = min(live)[2]
    return rep_of


class PlannedDeduper(Deduper):
    """The local `Deduper` (exact keys, winners, reasons) with the near decisions taken from `plan_near`; with a
    prior index, its clusters as the local one builds them (all keys in cluster 0, a cluster per signature)."""

    def __init__(self, rep_of: dict[bytes, bytes], cfg: MineConfig, prior: DedupeIndex | None = None):
        super().__init__(near=False, threshold=cfg.dedupe.threshold, num_perm=cfg.dedupe.num_perm, prior=prior)
        self.rep_of = rep_of
        self.rep_sigs: list[bytes] = []
        self.prior_cluster: dict[bytes, int] = {}
        if prior is not None and cfg.dedupe.near:
            for n in range(len(prior.sigs)):
                self.prior_cluster[prior_key(n)] = self._new_cluster(-1, b"", None, 1 << 30, "", "")
            self.n_prior = len(self.best_seq)

    def _find(self, key: bytes, sig: Any) -> tuple[int | None, str, None]:
        c = self.by_key.get(key)
        if c is None and key in self.rep_of:
            rep = self.rep_of[key]  # the representative came earlier, so it has its cluster
            c = self.prior_cluster[rep] if rep in self.prior_cluster else self.by_key[rep]
            self.by_key[key] = c
            return c, "near", None
        if c is None:
            self.rep_sigs.append(sig)
        return c, "exact", None

    def index(self, shingle: int) -> DedupeIndex:
        import numpy as np

        sigs = [np.frombuffer(s, dtype=np.uint32).copy() for s in self.rep_sigs if s]
        return DedupeIndex(self.num_perm, shingle, list(self.by_key), self._prior_sigs + sigs)


# ------------------------------------------------------------------------------------------ 5. route + write
def _event(r: dict) -> tuple:
    gap = (r["gap_key"], r["gap_line"]) if r["gap_key"] else None
    kind = r["kind"]
    if kind == "cand":
        return Cand("cand", r["line"], r["record"], r["key"], r["sig"] or None, gap, r["rating"], r["rid"],
                    r["grp"])
    if kind in ("pair", "pref"):
        return PrefEvent(kind, r["line"], r["pref_id"], r["pref_json"])
    if kind == "reject":
        return Reject("reject", r["line"], r["reason"], r["raw"])
    return Filtered("filtered", r["line"], r["reason"], gap)


def route_all(events: Any, router: engine.Router, plan: list[engine.InputFile], n_blocks: int,
              progress: engine.ProgressFn) -> dict[int, int]:
    """Stream the events, in batches in input order, through the local `Router`; returns {worker pid: peak
    RSS bytes}."""
    last, done, rss = -1, 0, {}
    progress("ray: route", 0, n_blocks)
    for batch in events.iter_batches(batch_format="pyarrow", batch_size=ROUTE_ROWS):
        pending: list[tuple] = []
        file_of = -1
        for r in batch.to_pylist():
            if r["ord"] <= last:
                raise RuntimeError("Ray returned the events out of input order")
            last = r["ord"]
            i = r["ord"] >> (_BLOCK_BITS + _POS_BITS)
            if r["kind"] == "error":
                raise InputError(r["reason"])
            if i != file_of and pending:
                router.route(file_of, plan[file_of].counts, pending)
                pending = []
            file_of = i
            if r["kind"] == "block":
                stats = json.loads(r["reason"])
                router.pii.update(stats["pii"])
                key = f"{stats['node']}:{stats['pid']}"
                rss[key] = max(rss.get(key, 0), stats["rss"])
                done += 1
                progress("ray: route", done, n_blocks)
                continue
            pending.append(_event(r))
        if pending:
            router.route(file_of, plan[file_of].counts, pending)
    return rss


@contextmanager
def ray_session(rc: RayConfig) -> Iterator[Any]:
    """The running Ray (a caller's, e.g. a test's), else `ray.init` on `rc.address` (None: a local Ray with
    `rc.num_cpus`), shut down afterwards."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    kw: dict[str, Any] = {"address": rc.address, "include_dashboard": False, "log_to_driver": False,
                          "logging_level": "ERROR"}
    if rc.address is None:
        kw["num_cpus"] = rc.num_cpus
    ray.init(**kw)
    try:
        yield ray
    finally:
        ray.shutdown()


def _datasets(ray: Any, tasks: list[dict], cfg: MineConfig, prior: DedupeIndex | None,
              clock: dict[str, float]) -> tuple[Any, dict[bytes, bytes]]:
    """Stages 1-4: the materialised events and the near plan; `clock` gets each stage's seconds and sizes. The
    prior index reaches the workers once: its keys in one `ray.put` (every candidate block filters on them), its
    signatures as blocks of the band stage."""
    import pyarrow as pa

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the events come back in input order
    ctx.enable_progress_bars = False
    events = (ray.data.from_items(tasks, override_num_blocks=len(tasks))
              .map_batches(curate_block, batch_size=1, fn_kwargs={"cfg_json": cfg.model_dump_json(),
                                                                  "ratings": _rating_refs(ray, tasks)},
                           batch_format="numpy")
              .materialize())
    _lap(clock, "curate")
    if not cfg.dedupe.near:
        return events, {}
    bands, rows = lsh_bands(cfg.dedupe.threshold, cfg.dedupe.num_perm)
    prior_keys = ray.put(pa.array(prior.keys, pa.binary())) if prior is not None and prior.keys else None
    nodes = (events.map_batches(new_candidates, fn_kwargs={"prior_keys": prior_keys}, batch_format="pyarrow",
                                batch_size=None)
             .groupby("key", num_partitions=len(tasks)).map_groups(first_occurrence, batch_format="pyarrow")
             .materialize())
    clock["nodes"] = nodes.count()
    _lap(clock, "exact_groups")
    if prior is not None and prior.sigs:
        nodes = nodes.union(ray.data.from_arrow(prior_nodes(prior, len(tasks))))
    pairs = (nodes.map_batches(band_rows, fn_kwargs={"bands": bands, "rows": rows}, batch_format="pyarrow",
                               batch_size=None)
             .groupby("bucket", num_partitions=len(tasks)).map_groups(bucket_pairs, fn_kwargs={"threshold": cfg.dedupe.threshold},
                                           batch_format="pyarrow")
             .materialize())
    clock["near_pairs"] = pairs.count()
    _lap(clock, "band_pairs")
    rep_of = plan_near(pairs.iter_rows())
    _lap(clock, "plan_near")
    return events, rep_of


def _rating_refs(ray: Any, tasks: list[dict]) -> dict[int, Any]:
    """{file index: ObjectRef of `readers.rating_lines`} of the chat-log files that hold rating lines."""
    files = {t["file"]: Path(t["path"]) for t in tasks if t["fmt"] == "chatlog" and t["lines"] >= 0}
    found = {i: readers.rating_lines(p) for i, p in files.items()}
    return {i: ray.put(r) for i, r in found.items() if r}


def _lap(clock: dict[str, float], stage: str) -> None:
    """Seconds since the last lap under `seconds.<stage>`."""
    now = time.perf_counter()
    clock[f"seconds.{stage}"] = now - clock.get("_t", now)
    clock["_t"] = now


def mine(inputs: list[str | Path], out: str | Path, cfg: MineConfig, force: bool = False,
         progress: engine.ProgressFn | None = None, prior: DedupeIndex | None = None) -> engine.Mined:
    """Write the dataset dir for `inputs` atomically with Ray; the same bytes as `engine.mine`."""
    progress = progress or engine._no_progress
    if prior is not None:
        prior.check(cfg.dedupe.num_perm, cfg.dedupe.shingle)
    plan = engine.plan_inputs(inputs, cfg)
    with ray_session(cfg.ray) as ray, atomic_dir(out, force=force, inputs=inputs, stage="mine") as tmp:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        tasks = plan_blocks(plan, cfg.ray.blocks or 4 * cpus, 0 if cfg.ray.blocks else MAX_BLOCK_BYTES)
        clock = {"_t": time.perf_counter()}
        events, rep_of = _datasets(ray, tasks, cfg, prior, clock)
        work_dir = tmp / ".work"
        work_dir.mkdir()
        router = engine.Router(tmp, work_dir, cfg)
        router.dedup = PlannedDeduper(rep_of, cfg, prior)
        router.rep_file = [-1] * len(router.dedup)
        rss = route_all(events, router, plan, len(tasks), progress)
        _lap(clock, "route")
        manifest = engine.write_outputs(tmp, router, plan, cfg, progress, prior)
        _lap(clock, "write")
        clock.pop("_t")
        workers = [v / 2**20 for _, v in sorted(rss.items())]
        stats = {"params": {"ray.cluster_address": cfg.ray.address or "local", "ray.cluster_cpus": cpus,
                            "ray.cluster_nodes": len([n for n in ray.nodes() if n.get("Alive")]),
                            "ray.block_tasks": len(tasks), "ray.workers": len(workers)},
                 "metrics": {"ray.near_joins": len(rep_of), "ray.worker_peak_rss_mb.max": max(workers, default=0),
                             "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                             **{f"ray.{k}": v for k, v in clock.items()},
                             **{f"ray.worker_peak_rss_mb.{n}": v for n, v in enumerate(workers)}}}
    return engine.Mined(manifest, router.dedup.index(cfg.dedupe.shingle), stats)
