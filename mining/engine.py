"""The mining algorithm: rated chat logs -> a dataset directory (SFT splits, preferences, rejects, manifest, card).

    mine_to_dir(inputs, out, cfg, progress=None) -> manifest

Phases (each a function below):
1. `plan_inputs`: expand inputs (a directory means its data files), detect each format, hash each file;
2. `stream_file`: records go through a process pool (parse -> curate -> redact -> dedupe keys) in input order, so
   the result does not depend on the number of workers;
3. `Router.route`: in this process, every record is counted under exactly one outcome, candidates are placed in
   dedupe clusters (`Deduper`) and spilled to a temp file (memory stays O(clusters), not O(records)), rating-gap
   candidates are spilled to buckets;
4. `write_splits`: second pass over the spill: each cluster's best-rated member goes to train/eval by hash of its
   group;
5. `finish`: manifest (`version` = hash of the outputs, inputs and config: no timestamps or absolute paths),
   samples and dataset card; the temp dir becomes `out` in one rename (`atomic_dir`).

Plain functions over plain data: progress goes to an optional callback `progress(task, done, total)`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from flywheel.foundation.errors import InputError
from flywheel.foundation.io import atomic_dir, dumps, sha256_file, sha256_text, write_json
from flywheel.foundation.procs import exit_with_parent
from flywheel.mining import ids, readers
from flywheel.mining.config import RUNTIME_KEYS, MineConfig, usable_cpus
from flywheel.mining.curate import normalise
from flywheel.mining.dedupe import DedupeIndex, Deduper
from flywheel.mining.preferences import GapMiner
from flywheel.mining.split import split_of

ProgressFn = Callable[[str, int, int], None]  # (task description, done, total), done/total in bytes


def _no_progress(task: str, done: int, total: int) -> None:
    pass


# ------------------------------------------------------------------------------------------ 1. plan the inputs
@dataclass
class StreamInput:
    """An input that is not a file: batches of items that a `work` task kind parses (traces that the shell reads
    from a tracking server: kind "traces", items (ordinal, trace dict)). `manifest` holds extra entries for the
    input's manifest record; the reader may fill it while the batches are consumed (e.g. the newest trace)."""
    name: str
    kind: str
    batches: Iterable[list]
    fmt: str
    manifest: dict = field(default_factory=dict)


@dataclass
class InputFile:
    path: Path | None  # None for a StreamInput
    fmt: str  # a readers.FORMATS name, or "empty" (a rotated log: counted, 0 records)
    counts: dict  # the manifest's per-input entry: path, sha256, format, read, kept, rejected, filtered
    stream: StreamInput | None = None


def _counts(name: str, sha: str, fmt: str) -> dict:
    return {"path": name, "sha256": sha, "format": fmt, "read": 0, "kept": 0, "rejected": 0, "filtered": Counter()}


def plan_inputs(inputs: Iterable[str | Path | StreamInput], cfg: MineConfig) -> list[InputFile]:
    """Files first (as given), then stream inputs."""
    inputs = list(inputs)
    streams = [x for x in inputs if isinstance(x, StreamInput)]
    files = readers.expand_inputs([x for x in inputs if not isinstance(x, StreamInput)])
    # An empty file (a rotated log) is counted with 0 records and named in the manifest and the warnings.
    fmts = ["empty" if readers.is_empty(f) else readers.detect_format(f) if cfg.format == "auto" else cfg.format
            for f in files]
    for f, fmt in zip(files, fmts):
        if fmt in ("oasst1", "oasst2", "hh") and f.suffix.lower() not in (".jsonl", ".json"):
            raise InputError(f"{f}: format {fmt} is JSONL only")
    return [InputFile(f, fmt, {**_counts(readers.display_name(f), sha256_file(f), fmt),
                               **({"empty": True} if fmt == "empty" else {})})
            for f, fmt in zip(files, fmts)] + [InputFile(None, x.fmt, _counts(x.name, "", x.fmt), x) for x in streams]


# ------------------------------------------------------------------------------------------ 2. stream through the pool
def settings(cfg: MineConfig) -> dict:
    """The plain (picklable) settings a worker needs."""
    return {"min_rating": cfg.min_rating, "min_chars": cfg.min_chars, "max_chars": cfg.max_chars,
            "languages": [x.lower() for x in cfg.languages], "redact": cfg.redact_pii,
            "detect_min_chars": cfg.detect_min_chars if cfg.detect_language else None,
            "gap_prefs": cfg.preferences.from_rating_gap, "near_dedupe": cfg.dedupe.near,
            "num_perm": cfg.dedupe.num_perm, "shingle": cfg.dedupe.shingle, "region": cfg.phone_region,
            "oasst_rating": cfg.oasst_rating, "max_line_bytes": cfg.max_line_bytes,
            "max_rank_pairs": cfg.preferences.max_rank_pairs, "system_template": cfg.system_template,
            "traces": cfg.traces.model_dump()}


def work(task: tuple) -> tuple[list[tuple], Counter]:
    """One batch in a worker: parse (if raw) then curate. Top-level so the process pool can pickle it."""
    from flywheel.mining import curate, pii

    kind, fmt, items, s = task
    pii.DEFAULT_REGION = s["region"]
    if kind == "lines":
        events = readers.parse_lines(fmt, items, s["oasst_rating"], s["max_line_bytes"], s["max_rank_pairs"],
                                     s.get("ratings"))
    elif kind == "rows":
        events = readers.parse_rows(items)
    elif kind == "traces":
        from flywheel.mining.traces import trace_events

        events = trace_events(items, s["traces"])
    else:
        events = items
    return curate.curate_events(events, s)


def batches(it: Iterable, n: int) -> Iterator[list]:
    batch: list = []
    for x in it:
        batch.append(x)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def ordered(pool, fn, tasks: Iterable, depth: int) -> Iterator:
    """Like pool.map, but with at most `depth` batches in flight (memory stays flat) and results in order."""
    if pool is None:
        for t in tasks:
            yield fn(t)
        return
    window: deque = deque()
    for t in tasks:
        window.append(pool.submit(fn, t))
        if len(window) >= depth:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def file_tasks(path: Path, fmt: str, cfg: MineConfig, s: dict, advance: Callable[[int], None]) -> Iterator[tuple]:
    """The worker tasks for one input file; `advance(n)` reports n more bytes read."""
    if path.suffix.lower() == ".csv":
        readers.csv_sniff_ok(path)
        for b in batches(readers.iter_csv_rows(path), cfg.batch_size):
            advance(sum(len(r[2]) for r in b))
            yield ("rows", fmt, b, s)
    elif path.suffix.lower() == ".parquet":
        for b in batches(((n, row, "") for n, row in readers.iter_parquet_rows(path)), cfg.batch_size):
            yield ("rows", fmt, b, s)
    elif fmt == "oasst1":  # threads need the whole file: parsed here, curated in the pool
        for b in batches(readers.read_oasst1(path, cfg.oasst_rating, cfg.max_line_bytes,
                                             cfg.preferences.max_rank_pairs), cfg.batch_size):
            yield ("events", fmt, b, s)
        advance(path.stat().st_size)
    else:
        ratings = readers.rating_lines(path) if fmt == "chatlog" else {}
        yield from line_tasks(readers.iter_raw_lines(path, cfg.max_line_bytes), fmt, s, ratings, cfg.batch_size,
                              advance)


def line_tasks(raw: Iterable, fmt: str, s: dict, ratings: dict, batch_size: int,
               advance: Callable[[int], None] = lambda n: None) -> Iterator[tuple]:
    """Pool tasks over raw lines, `batch_size` at a time; each carries the file's later rating lines (`ratings`)
    that its own conversations need, so a worker never gets the whole file's."""
    for b in batches(raw, batch_size):
        advance(sum(len(r[2]) for r in b))
        yield ("lines", fmt, b, {**s, "ratings": readers.batch_ratings(ratings, b)} if ratings else s)


# ------------------------------------------------------------------------------------------ 3. route the events
class Router:
    """Counts every record under one outcome and sends it where it goes: dedupe + spill, rejects, preferences."""

    def __init__(self, tmp: Path, work_dir: Path, cfg: MineConfig, prior: DedupeIndex | None = None):
        self.dedup = Deduper(near=cfg.dedupe.near, threshold=cfg.dedupe.threshold, num_perm=cfg.dedupe.num_perm,
                             prior=prior)
        self.gaps = GapMiner(work_dir / "gaps", min_gap=cfg.preferences.min_rating_gap)
        self.spill_path = work_dir / "candidates.jsonl"
        self.spill = open(self.spill_path, "w", encoding="utf-8")
        self.rejects = open(tmp / "rejects.jsonl", "w", encoding="utf-8")
        self.prefs = {"preferences": open(tmp / "preferences.jsonl", "w", encoding="utf-8"),
                      "preferences_eval": open(tmp / "preferences_eval.jsonl", "w", encoding="utf-8")}
        self.pref_splits = {"preferences": 0, "preferences_eval": 0}
        self.eval_fraction, self.salt = cfg.eval_fraction, cfg.split_salt
        self.pii: Counter = Counter()
        self.seen_prefs: set[str] = set()
        self.n_prefs = 0
        self.seq = 0
        self.rep_file: list[int] = [-1] * len(self.dedup)  # input file of each cluster's representative

    def write_pref(self, pid: str, line: str, prompt: list[dict] | None = None) -> None:
        """A preference goes to train or eval by the SFT split's hash (`split_of`, same salt and fraction) of its
        normalised prompt, so no prompt sits on both sides."""
        if pid in self.seen_prefs:
            return
        self.seen_prefs.add(pid)
        prompt = json.loads(line)["prompt"] if prompt is None else prompt
        group = "\x1e".join(f"{m['role']}\x1f{normalise(m['content'])}" for m in prompt)
        which = "preferences" if split_of(group, self.eval_fraction, self.salt) == "train" else "preferences_eval"
        self.prefs[which].write(line + "\n")
        self.pref_splits[which] += 1
        self.n_prefs += 1

    def route(self, i: int, c: dict, events: list[tuple]) -> None:
        """Events of input `i` (its manifest entry `c`)."""
        filtered = c["filtered"]
        for ev in events:
            kind = ev[0]
            if kind == "pref":  # derived (oasst sibling ranks): not a record of its own
                self.write_pref(ev.pref_id, ev.pref_json)
                continue
            c["read"] += 1
            if kind == "cand":  # place it in a dedupe cluster now, decide who wins at the end
                self.seq += 1
                cl, how = self.dedup.add(self.seq, ev.key, ev.sig, ev.rating, ev.id, ev.group)
                if how == "new":
                    self.rep_file.append(i)
                # the id as JSON: a conversation id may hold a tab; JSON escapes it
                self.spill.write(f"{self.seq}\t{i}\t{cl}\t{ev.key.hex()}\t{dumps(ev.id)}\t{ev.record}\n")
                if ev.gap is not None:
                    self.gaps.add(*ev.gap)
            elif kind == "filtered":
                filtered[ev.reason] += 1
                if ev.gap is not None:
                    self.gaps.add(*ev.gap)
            elif kind == "reject":
                c["rejected"] += 1
                self.rejects.write(dumps({"file": c["path"], "line": ev.line, "reason": ev.reason, "raw": ev.raw})
                                   + "\n")
            elif kind == "pair":
                if ev.pref_id in self.seen_prefs:
                    filtered["duplicate"] += 1
                else:
                    c["kept"] += 1
                    self.write_pref(ev.pref_id, ev.pref_json)

    def close_stream(self) -> None:
        self.spill.close()
        self.rejects.close()


def stream_file(pool, workers: int, router: Router, i: int, inp: InputFile, cfg: MineConfig, s: dict,
                progress: ProgressFn) -> None:
    name, total, done = f"mine {inp.counts['path']}", inp.path.stat().st_size, 0
    progress(name, 0, total)

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress(name, done, total)

    for events, pii_counts in ordered(pool, work, file_tasks(inp.path, inp.fmt, cfg, s, advance),
                                      depth=2 * workers):
        router.pii.update(pii_counts)
        router.route(i, inp.counts, events)
    progress(name, total, total)


def stream_input(pool, workers: int, router: Router, i: int, inp: InputFile, s: dict,
                 progress: ProgressFn) -> None:
    """A StreamInput through the same pool and router as a file; its sha256 covers every item it yielded."""
    import hashlib

    from flywheel.mining.traces import digest

    src, h, done = inp.stream, hashlib.sha256(), 0
    name = f"mine {src.name}"

    def tasks() -> Iterator[tuple]:
        nonlocal done
        for b in src.batches:
            digest(h, b)
            done += len(b)
            progress(name, done, done)
            yield (src.kind, src.fmt, b, s)

    for events, pii_counts in ordered(pool, work, tasks(), depth=2 * workers):
        router.pii.update(pii_counts)
        router.route(i, inp.counts, events)
    inp.counts.update({**src.manifest, "sha256": h.hexdigest()})
    if done == 0:
        inp.counts["empty"] = True


# ------------------------------------------------------------------------------------------ 4. split + write
@dataclass
class IdPlan:
    """`ids.resolve` over every shared id: winners superseded by a longer version, ids renamed by their file."""
    superseded: set[int] = field(default_factory=set)  # seqs
    renamed: dict[tuple[int, str], str] = field(default_factory=dict)  # (file index, id) -> new id


def _winners(router: Router) -> Iterator[tuple[str, int, int, str]]:
    """(id as JSON, seq, input index, record JSON) of each cluster's winner, from the spill."""
    with open(router.spill_path, encoding="utf-8") as sp:
        for line in sp:
            sq, i, cl, _key, rid, rec = line.split("\t", 5)
            if router.dedup.winner(int(cl)) == int(sq):
                yield rid, int(sq), int(i), rec


def plan_ids(router: Router, plan: list[InputFile]) -> IdPlan:
    """Two passes over the spill's cluster winners (memory O(clusters), like dedupe): which ids are shared, then
    the versions of those."""
    shared = {rid for rid, n in Counter(rid for rid, *_ in _winners(router)).items() if n > 1}
    out = IdPlan()
    if not shared:
        return out
    versions: dict[str, list[ids.Version]] = {}
    for rid, sq, i, rec in _winners(router):
        if rid in shared:  # the turns, not the system message: retrieved context may vary per turn
            turns = [m for m in json.loads(rec)["messages"] if m["role"] != "system"]
            versions.setdefault(rid, []).append(ids.Version(sq, i, ids.turn_chain(turns)))
    sha = [p.counts["sha256"] for p in plan]
    for rid, vs in versions.items():
        rec_id = json.loads(rid)
        sup, ren = ids.resolve(rec_id, vs, sha)
        out.superseded |= sup
        out.renamed.update({(f, rec_id): new for f, new in ren.items()})
    return out


def _output_line(router: Router, idp: IdPlan, i: int, cl: int, rec_id: str, rec: str) -> str:
    """The record's JSON with the cluster id spliced in ("cluster" sorts first); a reused id gets its file's."""
    dedup = router.dedup
    cluster = dedup.rep_id[cl]
    cluster = idp.renamed.get((router.rep_file[cl], cluster), cluster)
    if (i, rec_id) in idp.renamed:
        obj = json.loads(rec)
        obj["id"] = idp.renamed[(i, rec_id)]
        rec = dumps(obj) + "\n"
    return '{"cluster":' + dumps(cluster) + "," + rec[1:]


def write_splits(tmp: Path, router: Router, plan: list[InputFile], cfg: MineConfig,
                 progress: ProgressFn) -> tuple[dict, list[dict]]:
    """Each cluster's winner goes to its split; the others are counted as duplicates, a winner that a longer
    version of its conversation supersedes as `superseded`. Returns (split counts, samples)."""
    dedup, total, done = router.dedup, router.spill_path.stat().st_size, 0
    idp = plan_ids(router, plan)
    splits = {"train": 0, "eval": 0}
    samples: list[dict] = []
    with open(router.spill_path, encoding="utf-8") as sp, \
            open(tmp / "train.jsonl", "w", encoding="utf-8") as tr, \
            open(tmp / "eval.jsonl", "w", encoding="utf-8") as ev_f:
        progress("split + write", 0, total)
        for line in sp:
            done += len(line)
            progress("split + write", done, total)
            sq, i, cl, key_hex, rid, rec = line.split("\t", 5)
            i, cl = int(i), int(cl)
            if dedup.winner(cl) != int(sq):
                plan[i].counts["filtered"][dedup.duplicate_reason(cl, bytes.fromhex(key_hex))] += 1
                continue
            if int(sq) in idp.superseded:
                plan[i].counts["filtered"]["superseded"] += 1
                continue
            plan[i].counts["kept"] += 1
            which = split_of(dedup.rep_group[cl], cfg.eval_fraction, cfg.split_salt)
            out_line = _output_line(router, idp, i, cl, json.loads(rid) if idp.renamed else "", rec)
            (tr if which == "train" else ev_f).write(out_line)
            splits[which] += 1
            if which == "train" and len(samples) < 20:
                samples.append(json.loads(out_line))
    return splits, samples


def write_preferences(router: Router) -> None:
    """Rating-gap pairs, mined bucket by bucket once every answer has been seen."""
    for p in router.gaps.mine():
        router.write_pref(p["id"], dumps(p), p["prompt"])
    router.gaps.close()
    for f in router.prefs.values():
        f.close()


# ------------------------------------------------------------------------------------------ 5. manifest + card
def card_examples(samples: list[dict]) -> list[dict]:
    """Prefer examples that show a PII placeholder, so the card documents what redaction looks like."""
    from flywheel.mining.pii import PLACEHOLDERS

    with_pii = [r for r in samples if any(p in json.dumps(r, ensure_ascii=False) for p in PLACEHOLDERS)]
    return (with_pii[:1] + [r for r in samples if r not in with_pii[:1]])[:3]


def build_manifest(tmp: Path, plan: list[InputFile], pii_counts: Counter, splits: dict, n_prefs: int,
                   cfg: MineConfig, prior: DedupeIndex | None = None) -> dict:
    inputs = []
    total = {"read": 0, "kept": 0, "rejected": 0, "filtered": Counter()}
    for c in (p.counts for p in plan):
        if c["read"] != c["kept"] + c["rejected"] + sum(c["filtered"].values()):  # the invariant: a bug if not
            raise RuntimeError(f"record accounting does not reconcile for {c['path']}: {c}")
        inputs.append({**c, "filtered": dict(sorted(c["filtered"].items()))})
        for k in ("read", "kept", "rejected"):
            total[k] += c[k]
        total["filtered"].update(c["filtered"])
    counts = {**total, "filtered": dict(sorted(total["filtered"].items())), "preferences": n_prefs,
              "pii": dict(sorted(pii_counts.items()))}
    config = {k: v for k, v in cfg.model_dump().items() if k not in RUNTIME_KEYS}
    if not any(p.stream for p in plan):  # trace settings change nothing a file run writes: same version as before
        config.pop("traces")
    files = {name: sha256_file(tmp / name) for name in ("train.jsonl", "eval.jsonl", "preferences.jsonl",
                                                         "preferences_eval.jsonl", "rejects.jsonl")}
    body = {"inputs": inputs, "counts": counts, "splits": splits, "config": config, "files": files}
    if prior is not None:  # what the earlier batches' index held (absent without one: same version as before)
        body["prior_index"] = {"keys": len(prior.keys), "signatures": len(prior.sigs)}
    return {"version": sha256_text(dumps(body))[:16], "schema": 1, **body}


def finish(tmp: Path, manifest: dict, samples: list[dict]) -> None:
    from flywheel.mining.card import render_card

    with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
        f.writelines(dumps(r) + "\n" for r in samples)
    examples = card_examples(samples)
    if not examples:  # preference-only inputs (hh-rlhf): show pairs instead
        with open(tmp / "preferences.jsonl", encoding="utf-8") as f:
            examples = [json.loads(x) for _, x in zip(range(3), f)]
    (tmp / "README.md").write_text(render_card(manifest, examples), encoding="utf-8")
    write_json(tmp / "manifest.json", manifest)
    # mkdtemp/mkstemp create owner-only modes; a dataset is meant to be read by others (and MLflow).
    tmp.chmod(0o755)
    for p in tmp.iterdir():
        p.chmod(0o644)


def write_outputs(tmp: Path, router: Router, plan: list[InputFile], cfg: MineConfig, progress: ProgressFn,
                  prior: DedupeIndex | None = None) -> dict:
    """Phases 4-5 once every event went through `router`: splits, preferences, manifest, card; the manifest."""
    router.close_stream()
    splits, samples = write_splits(tmp, router, plan, cfg, progress)
    write_preferences(router)
    splits.update(router.pref_splits)
    shutil.rmtree(router.spill_path.parent)
    manifest = build_manifest(tmp, plan, router.pii, splits, router.n_prefs, cfg, prior)
    finish(tmp, manifest, samples)
    return manifest


# ------------------------------------------------------------------------------------------ the whole run
def open_pool(workers: int):
    """A process pool for `work` whose workers exit when this process dies (a `kill -9` of `flywheel mine` would
    otherwise leave them running, reparented to init), or None to run in this process."""
    if workers <= 1:
        return None
    import multiprocessing as mp
    import threading
    from concurrent.futures import ProcessPoolExecutor

    # fork starts in milliseconds and works from any __main__ (stdin, notebooks), but forking a process that
    # runs threads (an earlier MLflow run in the same `flywheel run`) can deadlock: spawn then.
    method = "fork" if threading.active_count() == 1 and "fork" in mp.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method),
                               initializer=exit_with_parent, initargs=(os.getpid(),))


@dataclass
class Mined:
    manifest: dict
    index: DedupeIndex  # `prior` plus what this run kept: the next batch's prior
    stats: dict = field(default_factory=dict)  # engine facts for tracking (the Ray engine: cluster, peak RSS)


def mine(inputs: list[str | Path | StreamInput], out: str | Path, cfg: MineConfig, force: bool = False,
         progress: ProgressFn | None = None, prior: DedupeIndex | None = None) -> Mined:
    """Write the dataset dir for `inputs` atomically. `prior`: what earlier batches kept (dropped here as
    `duplicate_earlier_batch`)."""
    progress = progress or _no_progress
    if prior is not None:
        prior.check(cfg.dedupe.num_perm, cfg.dedupe.shingle)
    plan = plan_inputs(inputs, cfg)
    s = settings(cfg)
    workers = cfg.workers or min(2, usable_cpus())
    pool = open_pool(workers)
    try:
        files = [x for x in inputs if not isinstance(x, StreamInput)]
        with atomic_dir(out, force=force, inputs=files, stage="mine") as tmp:
            work_dir = tmp / ".work"
            work_dir.mkdir()
            router = Router(tmp, work_dir, cfg, prior)
            for i, inp in enumerate(plan):
                if inp.stream is not None:
                    stream_input(pool, workers, router, i, inp, s, progress)
                elif inp.fmt != "empty":
                    stream_file(pool, workers, router, i, inp, cfg, s, progress)
            manifest = write_outputs(tmp, router, plan, cfg, progress, prior)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return Mined(manifest, router.dedup.index(cfg.dedupe.shingle))


def mine_to_dir(inputs: list[str | Path], out: str | Path, cfg: MineConfig, force: bool = False,
                progress: ProgressFn | None = None) -> dict:
    """`mine` without a prior index; returns the manifest."""
    return mine(inputs, out, cfg, force=force, progress=progress).manifest
