"""`flywheel mine`: rated chat logs -> a versioned dataset dir (SFT + preferences), tracked in MLflow.

    flywheel mine ../shared/data/oasst1-en-validation --out data/oasst1 [--config configs/mine.yaml] [k=v ...]

The recipe, top to bottom:
1. expand inputs (a directory means its data files), detect each format, hash each file;
2. stream records through a process pool (parse -> curate -> redact -> dedupe keys; `flywheel.mining`), in input
   order, so the result does not depend on the number of workers;
3. in this process: count every record under exactly one outcome, dedupe into clusters (`Deduper`), spill
   survivors to a temp file (memory stays O(clusters), not O(records)), spill rating-gap candidates to buckets;
4. second pass over the spill: each cluster's best-rated member goes to train/eval by hash of its group;
5. manifest (`version` = hash of the outputs, inputs and config: no timestamps or absolute paths inside),
   dataset card; the temp dir becomes `--out` in one rename;
6. MLflow run in `flywheel/mine`: params, counts (one batched call), the dataset as an `mlflow.data` input,
   manifest/card/samples as artifacts.

Python entry for `flywheel demo` / `flywheel run`: `run_mine(inputs, out, cfg) -> dict`. An empty input file (a
rotated log) is counted (0 records, `"empty": true` in the manifest) and named in the result's `warnings`; only a
run whose inputs are all empty is an error.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, deque
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import typer
from pydantic import Field, field_validator

from flywheel.pipelines.config import StageConfig, load_config, split_args

# Keys that change how fast a run goes or where it is logged, never what it writes: kept out of the version.
RUNTIME_KEYS = ("workers", "batch_size", "tracking_uri", "log_mlflow", "progress")


class DedupeConfig(StageConfig):
    near: bool = True  # MinHash LSH near-dedupe; exact dedupe (normalised text) always runs
    threshold: float = Field(0.8, gt=0, le=1)  # estimated Jaccard; 0.8 with 3-shingles catches one-word edits
    num_perm: int = Field(128, ge=16, le=512)
    shingle: int = Field(3, ge=1, le=10)  # word shingles; 5 misses one-word edits of short chat messages


class PreferenceConfig(StageConfig):
    from_rating_gap: bool = True
    min_rating_gap: int = Field(2, ge=1, le=4)
    max_rank_pairs: int = Field(3, ge=1)  # oasst: best sibling vs up to this many worse ones


class MineConfig(StageConfig):
    format: Literal["auto", "chatlog", "oasst1", "oasst2", "hh"] = "auto"
    min_rating: int = Field(4, ge=1, le=5)  # 4-5 stars is "good enough to imitate"
    min_chars: int = Field(2, ge=0)  # shortest assistant reply kept
    max_chars: int = Field(20_000, gt=0)  # longest conversation (all turns + context) kept
    languages: list[str] = []  # e.g. [en]; empty = no language filter. A declared `lang` decides, else detection
    detect_language: bool = True  # with `languages`: detect the reply's language when no `lang` is declared
    detect_min_chars: int = Field(20, ge=1)  # shorter replies are not judged by the detector (they pass)
    oasst_rating: Literal["quality", "helpfulness", "rank", "quality_then_rank"] = "quality"
    redact_pii: bool = True
    phone_region: str = "US"  # region for phone numbers written without a +country code
    dedupe: DedupeConfig = DedupeConfig()
    preferences: PreferenceConfig = PreferenceConfig()
    eval_fraction: float = Field(0.2, ge=0, lt=1)  # 100 kept records -> ~20 eval cases, the gate's min_cases
    split_salt: str = "flywheel"
    system_template: str = "Answer using this context:\n{context}"
    max_line_bytes: int = Field(1_000_000, gt=0)  # longer lines are rejected unread (a 10 MB line is not a chat)
    workers: int = Field(0, ge=0)  # processes for parse+curate; 0 = min(2, cpus); 1 = in-process
    batch_size: int = Field(512, ge=1)
    tracking_uri: str | None = None
    log_mlflow: bool = True
    progress: bool = True

    @field_validator("workers")
    @classmethod
    def _workers_fit_cpus(cls, v: int) -> int:
        # more processes than CPUs only adds fork and pickling overhead (and memory: each holds a batch)
        cpus = usable_cpus()
        if v > cpus:
            raise ValueError(f"workers={v} is more than the {cpus} CPUs this process may use; use at most {cpus} "
                             "(0 picks min(2, CPUs))")
        return v


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------------ the work
def _settings(cfg: MineConfig) -> dict:
    return {"min_rating": cfg.min_rating, "min_chars": cfg.min_chars, "max_chars": cfg.max_chars,
            "languages": [x.lower() for x in cfg.languages], "redact": cfg.redact_pii,
            "detect_min_chars": cfg.detect_min_chars if cfg.detect_language else None,
            "gap_prefs": cfg.preferences.from_rating_gap, "near_dedupe": cfg.dedupe.near,
            "num_perm": cfg.dedupe.num_perm, "shingle": cfg.dedupe.shingle, "region": cfg.phone_region,
            "oasst_rating": cfg.oasst_rating, "max_line_bytes": cfg.max_line_bytes,
            "max_rank_pairs": cfg.preferences.max_rank_pairs, "system_template": cfg.system_template}


def _work(task: tuple) -> tuple[list[tuple], Counter]:
    """One batch in a worker: parse (if raw) then curate. Top-level so the process pool can pickle it."""
    from flywheel.mining import curate, pii, readers

    kind, fmt, items, s = task
    pii.DEFAULT_REGION = s["region"]
    if kind == "lines":
        events = readers.parse_lines(fmt, items, s["oasst_rating"], s["max_line_bytes"], s["max_rank_pairs"])
    elif kind == "rows":
        events = readers.parse_rows(items)
    else:
        events = items
    return curate.curate_events(events, s)


def _batches(it: Iterable, n: int) -> Iterator[list]:
    batch: list = []
    for x in it:
        batch.append(x)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def _ordered(pool, fn, tasks: Iterable, depth: int) -> Iterator:
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


def _tasks(path: Path, fmt: str, cfg: MineConfig, s: dict, advance) -> Iterator[tuple]:
    from flywheel.mining import readers

    if path.suffix.lower() == ".csv":
        readers.csv_sniff_ok(path)
        for b in _batches(readers.iter_csv_rows(path), cfg.batch_size):
            advance(sum(len(r[2]) for r in b))
            yield ("rows", fmt, b, s)
    elif path.suffix.lower() == ".parquet":
        for b in _batches(((n, row, "") for n, row in readers.iter_parquet_rows(path)), cfg.batch_size):
            yield ("rows", fmt, b, s)
    elif fmt == "oasst1":  # threads need the whole file: parsed here, curated in the pool
        for b in _batches(readers.read_oasst1(path, cfg.oasst_rating, cfg.max_line_bytes,
                                              cfg.preferences.max_rank_pairs), cfg.batch_size):
            yield ("events", fmt, b, s)
        advance(path.stat().st_size)
    else:
        for b in _batches(readers.iter_raw_lines(path, cfg.max_line_bytes), cfg.batch_size):
            advance(sum(len(r[2]) for r in b))
            yield ("lines", fmt, b, s)


def _progress(enabled: bool):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=False)


def mine_to_dir(inputs: list[str | Path], out: str | Path, cfg: MineConfig, force: bool = False) -> dict:
    """Steps 1-5 (no MLflow): write the dataset dir atomically, return the manifest."""
    from flywheel.mining import readers
    from flywheel.mining.card import render_card
    from flywheel.mining.dedupe import Deduper
    from flywheel.mining.preferences import GapMiner
    from flywheel.mining.split import split_of
    from flywheel.foundation.errors import InputError
    from flywheel.foundation.io import atomic_dir, dumps, sha256_file, write_json

    files = readers.expand_inputs(inputs)
    # An empty file (a rotated log) is counted with 0 records and named in the manifest and the warnings.
    fmts = ["empty" if readers.is_empty(f) else readers.detect_format(f) if cfg.format == "auto" else cfg.format
            for f in files]
    for f, fmt in zip(files, fmts):
        if fmt in ("oasst1", "oasst2", "hh") and f.suffix.lower() not in (".jsonl", ".json"):
            raise InputError(f"{f}: format {fmt} is JSONL only")
    s = _settings(cfg)
    workers = cfg.workers or min(2, usable_cpus())
    per_input = [{"path": readers.display_name(f), "sha256": sha256_file(f), "format": fmt, "read": 0, "kept": 0,
                  "rejected": 0, "filtered": Counter(), **({"empty": True} if fmt == "empty" else {})}
                 for f, fmt in zip(files, fmts)]
    pii_counts: Counter = Counter()
    dedup = Deduper(near=cfg.dedupe.near, threshold=cfg.dedupe.threshold, num_perm=cfg.dedupe.num_perm)
    seen_prefs: set[str] = set()
    n_prefs = 0

    pool = None
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # fork starts in milliseconds and works from any __main__ (stdin, notebooks), but forking a process
        # that runs threads (an earlier MLflow run in the same `flywheel run`) can deadlock: spawn then.
        import threading

        method = "fork" if threading.active_count() == 1 and "fork" in mp.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method))
    try:
        with atomic_dir(out, force=force, inputs=inputs, stage="mine") as tmp, _progress(cfg.progress) as bar:
            work = tmp / ".work"
            work.mkdir()
            gaps = GapMiner(work / "gaps", min_gap=cfg.preferences.min_rating_gap)
            spill = open(work / "candidates.jsonl", "w", encoding="utf-8")
            rej_f = open(tmp / "rejects.jsonl", "w", encoding="utf-8")
            pref_f = open(tmp / "preferences.jsonl", "w", encoding="utf-8")
            seq = 0

            def write_pref(pid: str, line: str) -> None:
                nonlocal n_prefs
                if pid not in seen_prefs:
                    seen_prefs.add(pid)
                    pref_f.write(line + "\n")
                    n_prefs += 1

            for i, (f, fmt) in enumerate(zip(files, fmts)):
                if fmt == "empty":
                    continue
                c = per_input[i]
                filtered = c["filtered"]
                task = bar.add_task(f"mine {c['path']}", total=f.stat().st_size)
                tasks = _tasks(f, fmt, cfg, s, lambda n, t=task: bar.advance(t, n))
                for events, pc in _ordered(pool, _work, tasks, depth=2 * workers):
                    pii_counts.update(pc)
                    for ev in events:
                        kind = ev[0]
                        if kind != "pref":  # derived preferences are not records; everything else is one
                            c["read"] += 1
                        if kind == "cand":  # place it in a dedupe cluster now, decide who wins at the end
                            seq += 1
                            cl, _how = dedup.add(seq, ev[3], ev[4], ev[6], ev[7], ev[8])
                            spill.write(f"{seq}\t{i}\t{cl}\t{ev[3].hex()}\t{ev[2]}\n")
                            if ev[5] is not None:
                                gaps.add(*ev[5])
                            continue
                        if kind == "pref":  # derived (oasst sibling ranks): not a record of its own
                            write_pref(ev[2], ev[3])
                            continue
                        if kind == "filtered":
                            filtered[ev[2]] += 1
                            if len(ev) > 3 and ev[3] is not None:
                                gaps.add(*ev[3])
                        elif kind == "reject":
                            c["rejected"] += 1
                            rej_f.write(dumps({"file": c["path"], "line": ev[1], "reason": ev[2], "raw": ev[3]})
                                        + "\n")
                        elif kind == "pair":
                            if ev[2] in seen_prefs:
                                filtered["duplicate"] += 1
                            else:
                                c["kept"] += 1
                                write_pref(ev[2], ev[3])
                bar.update(task, completed=f.stat().st_size)
            spill.close()
            rej_f.close()

            # Second pass: each cluster's winner goes to its split; the others are counted as duplicates. The
            # records were serialised by the workers; only the cluster id is spliced in ("cluster" sorts first).
            split_task = bar.add_task("split + write", total=(work / "candidates.jsonl").stat().st_size)
            splits = {"train": 0, "eval": 0}
            samples: list[dict] = []
            with open(work / "candidates.jsonl", encoding="utf-8") as sp, \
                    open(tmp / "train.jsonl", "w", encoding="utf-8") as tr, \
                    open(tmp / "eval.jsonl", "w", encoding="utf-8") as ev_f:
                for line in sp:
                    bar.advance(split_task, len(line))
                    sq, i, cl, key_hex, rec = line.split("\t", 4)
                    i, cl = int(i), int(cl)
                    if dedup.winner(cl) != int(sq):
                        per_input[i]["filtered"][dedup.duplicate_reason(cl, bytes.fromhex(key_hex))] += 1
                        continue
                    per_input[i]["kept"] += 1
                    which = split_of(dedup.rep_group[cl], cfg.eval_fraction, cfg.split_salt)
                    out_line = '{"cluster":' + dumps(dedup.rep_id[cl]) + "," + rec[1:]
                    (tr if which == "train" else ev_f).write(out_line)
                    splits[which] += 1
                    if which == "train" and len(samples) < 20:
                        samples.append(json.loads(out_line))
            for p in gaps.mine():
                write_pref(p["id"], dumps(p))
            gaps.close()
            pref_f.close()
            shutil.rmtree(work)

            manifest = _manifest(tmp, per_input, pii_counts, splits, n_prefs, cfg)
            with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
                f.writelines(dumps(r) + "\n" for r in samples)
            examples = _card_examples(samples)
            if not examples:  # preference-only inputs (hh-rlhf): show pairs instead
                with open(tmp / "preferences.jsonl", encoding="utf-8") as f:
                    examples = [json.loads(x) for _, x in zip(range(3), f)]
            (tmp / "README.md").write_text(render_card(manifest, examples), encoding="utf-8")
            write_json(tmp / "manifest.json", manifest)
            # mkdtemp/mkstemp create owner-only modes; a dataset is meant to be read by others (and MLflow).
            tmp.chmod(0o755)
            for p in tmp.iterdir():
                p.chmod(0o644)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return manifest


def _card_examples(samples: list[dict]) -> list[dict]:
    """Prefer examples that show a PII placeholder, so the card documents what redaction looks like."""
    from flywheel.mining.pii import PLACEHOLDERS

    with_pii = [r for r in samples if any(p in json.dumps(r, ensure_ascii=False) for p in PLACEHOLDERS)]
    return (with_pii[:1] + [r for r in samples if r not in with_pii[:1]])[:3]


def _manifest(tmp: Path, per_input: list[dict], pii_counts: Counter, splits: dict, n_prefs: int,
              cfg: MineConfig) -> dict:
    from flywheel.foundation.io import dumps, sha256_file, sha256_text

    inputs = []
    total = {"read": 0, "kept": 0, "rejected": 0, "filtered": Counter()}
    for c in per_input:
        if c["read"] != c["kept"] + c["rejected"] + sum(c["filtered"].values()):  # the invariant: a bug if not
            raise RuntimeError(f"record accounting does not reconcile for {c['path']}: {c}")
        inputs.append({**c, "filtered": dict(sorted(c["filtered"].items()))})
        for k in ("read", "kept", "rejected"):
            total[k] += c[k]
        total["filtered"].update(c["filtered"])
    counts = {**total, "filtered": dict(sorted(total["filtered"].items())), "preferences": n_prefs,
              "pii": dict(sorted(pii_counts.items()))}
    config = {k: v for k, v in cfg.model_dump().items() if k not in RUNTIME_KEYS}
    files = {name: sha256_file(tmp / name) for name in ("train.jsonl", "eval.jsonl", "preferences.jsonl",
                                                         "rejects.jsonl")}
    body = {"inputs": inputs, "counts": counts, "splits": splits, "config": config, "files": files}
    return {"version": sha256_text(dumps(body))[:16], "schema": 1, **body}


def run_mine(inputs: list[str | Path], out: str | Path, cfg: MineConfig | None = None, force: bool = False) -> dict:
    """Mine `inputs` into `out` and log the run to MLflow (`flywheel/mine`).

    Returns {"run_id" (None when cfg.log_mlflow is false), "out" (absolute path), "manifest" (dict),
    "version", "counts", "splits"}.
    """
    cfg = cfg or MineConfig()
    manifest = mine_to_dir(inputs, out, cfg, force=force)
    out = Path(out).resolve()
    run_id = _log_run(out, manifest, cfg) if cfg.log_mlflow else None
    return {"run_id": run_id, "out": str(out), "manifest": manifest, "version": manifest["version"],
            "counts": manifest["counts"], "splits": manifest["splits"], "warnings": input_warnings(manifest)}


def input_warnings(manifest: dict) -> list[str]:
    return [f"{i['path']}: empty input file (0 records)" for i in manifest["inputs"] if i.get("empty")]


def _log_run(out: Path, manifest: dict, cfg: MineConfig) -> str:
    import warnings

    import mlflow
    from mlflow.data.meta_dataset import MetaDataset

    from flywheel.pipelines import tracking
    from flywheel.pipelines.config import flatten

    c = manifest["counts"]
    metrics: dict[str, float] = {"read": c["read"], "kept": c["kept"], "rejected": c["rejected"],
                                 "split.train": manifest["splits"]["train"],
                                 "split.eval": manifest["splits"]["eval"], "preferences": c["preferences"]}
    metrics.update({f"filtered.{k}": v for k, v in c["filtered"].items()})
    metrics.update({f"pii.{k}": v for k, v in c["pii"].items()})
    tags = {"flywheel.dataset_version": manifest["version"], "flywheel.dataset_path": str(out)}
    inputs = {"logs": ",".join(i["path"] for i in manifest["inputs"]),
              "logs_sha256": ",".join(i["sha256"][:16] for i in manifest["inputs"])}
    params = flatten({k: v for k, v in cfg.model_dump().items() if k not in ("progress",)})
    with tracking.start_run("mine", run_name=f"mine-{manifest['version']}", inputs=inputs, tags=tags,
                            params=params, configured_uri=cfg.tracking_uri) as run:
        tracking.log_metrics(metrics)
        with warnings.catch_warnings():  # "source can be interpreted in multiple ways": it is a local dir
            warnings.simplefilter("ignore")
            from mlflow.data.dataset_source_registry import resolve_dataset_source

            ds = MetaDataset(source=resolve_dataset_source(str(out)), name=f"flywheel-mine-{manifest['version']}",
                             digest=manifest["version"])
            mlflow.log_input(ds, context="training")
        for name in ("manifest.json", "README.md", "samples.jsonl"):
            mlflow.log_artifact(str(out / name))
        return run.info.run_id


# ------------------------------------------------------------------------------------------------ the CLI
def register(app: typer.Typer) -> None:
    @app.command("mine")
    def mine(
        args: list[str] = typer.Argument(..., metavar="INPUT... [KEY=VALUE...]",
                                         help="log files or directories (JSONL/CSV/Parquet, oasst, hh), then "
                                              "key=value config overrides, e.g. min_rating=5"),
        out: Path = typer.Option(..., "--out", "-o", help="dataset directory to write (a new or empty one, or an earlier Flywheel output)"),
        config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (configs/mine.yaml)"),
        force: bool = typer.Option(False, "--force", help="replace an existing --out directory Flywheel did not write"),
    ) -> None:
        """Rated chat logs -> versioned SFT + preference JSONL, tracked in MLflow (`flywheel/mine`)."""
        # One variadic argument holds both: an argument with '=' is an override unless it names an existing path.
        paths, extra = split_args(args)
        if not paths:
            raise typer.BadParameter("give at least one INPUT file or directory")
        cfg = load_config(MineConfig, config, extra)
        res = run_mine(paths, out, cfg, force=force)
        c = res["counts"]
        for w in res["warnings"]:
            typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
        typer.echo(f"dataset {res['version']} -> {res['out']}")
        typer.echo(f"read {c['read']} = kept {c['kept']} + rejected {c['rejected']} + filtered "
                   f"{sum(c['filtered'].values())} {dict(c['filtered'])}")
        typer.echo(f"train {res['splits']['train']}  eval {res['splits']['eval']}  preferences {c['preferences']}"
                   f"  pii {dict(c['pii'])}")
        if res["run_id"]:
            typer.echo(f"mlflow run {res['run_id']} (experiment flywheel/mine)")

