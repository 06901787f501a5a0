"""Read outcome tables: canonical chat logs (JSONL), any JSONL / JSON array / CSV / Parquet table.

Only the columns the analysis needs are kept. Nested fields are reached with dotted names
(`scores.overall` in the USR Topical-Chat file). Each row remembers its file and line so a bad value can be
reported as `logs.jsonl:17: rating: 'five' is not a number`. Malformed JSON lines are counted as unusable rows
with their location, never silently skipped.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from flywheel.foundation.errors import InputError

_LABELLED = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*(?:-|:|\()\s*\S")  # "7 - Strongly support", "4 (good)"


def _get(rec: dict, path: str):
    if path in rec:
        return rec[path]
    node = rec
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def load_table(paths: Iterable[str | Path], columns: list[str]) -> tuple["pd.DataFrame", dict]:  # noqa: F821
    """Rows of all files, restricted to `columns` (+ `_file`, `_line`). Returns (frame, problems) where problems
    = {"invalid_json": n, "examples": ["file:line: ..."]}."""
    import pandas as pd

    frames = []
    problems: dict = {"invalid_json": 0, "examples": []}
    cols = list(dict.fromkeys(c for c in columns if c))
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise InputError(f"{p}: input file does not exist")
        suffix = "".join(p.suffixes[-2:]).lower() if p.suffix == ".gz" else p.suffix.lower()
        if suffix in (".csv", ".tsv", ".csv.gz"):
            sep = "\t" if suffix == ".tsv" else ","
            df = pd.read_csv(p, sep=sep, low_memory=False)
            df["_line"] = _csv_start_lines(p, sep, len(df))
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(p)
            df["_line"] = np.arange(1, len(df) + 1)
        elif suffix in (".jsonl", ".ndjson", ".json"):
            df = _read_json(p, cols, problems)
        else:
            raise InputError(f"{p}: unknown format {p.suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet")
        missing = [c for c in cols if c not in df.columns]
        if suffix not in (".jsonl", ".ndjson", ".json") and missing:
            raise InputError(f"{p}: column(s) {missing} not found; columns are {list(df.columns)[:30]}")
        df = df[[c for c in cols if c in df.columns] + ["_line"]].copy()
        for c in cols:
            if c not in df.columns:
                df[c] = None
        df["_file"] = str(p)
        frames.append(df)
    if not frames:
        raise InputError("no input files given")
    out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return out, problems


def _csv_start_lines(p: Path, sep: str, n_rows: int, max_bytes: int = 100 << 20) -> np.ndarray:
    """The file line where each data row starts (quoted cells may span lines, as in the persuasion CSV).
    Files over `max_bytes` (or gzipped) get row number + 1, exact only without multi-line cells."""
    import csv

    if p.suffix != ".gz" and p.stat().st_size <= max_bytes:
        starts = []
        with open(p, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f, delimiter=sep)
            prev = 0
            for i, _ in enumerate(reader):
                if i:
                    starts.append(prev + 1)
                prev = reader.line_num
        if len(starts) == n_rows:
            return np.asarray(starts, dtype=np.int64)
    return np.arange(2, n_rows + 2)


def _read_json(p: Path, cols: list[str], problems: dict):
    import pandas as pd

    try:
        import orjson

        loads = orjson.loads
    except ImportError:  # pragma: no cover
        loads = json.loads
    text = p.read_bytes()
    head = text.lstrip()[:1]
    records: list[tuple[int, dict]] = []
    if head == b"[":
        try:
            arr = loads(text)
        except ValueError as e:
            raise InputError(f"{p}: invalid JSON array ({e})") from None
        records = [(i + 1, r) for i, r in enumerate(arr)]  # "line" = record number for arrays
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((i, loads(line)))
            except ValueError as e:
                problems["invalid_json"] += 1
                if len(problems["examples"]) < 10:
                    problems["examples"].append(f"{p}:{i}: invalid JSON ({str(e)[:60]})")
    data = {c: [] for c in cols}
    lines = []
    for i, r in records:
        if not isinstance(r, dict):
            problems["invalid_json"] += 1
            if len(problems["examples"]) < 10:
                problems["examples"].append(f"{p}:{i}: not a JSON object")
            continue
        lines.append(i)
        for c in cols:
            data[c].append(_get(r, c))
    df = pd.DataFrame(data)
    df["_line"] = np.asarray(lines, dtype=np.int64)
    return df


def to_numeric(values) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, bad mask or None when nothing is bad). Numbers, booleans, numeric strings and labelled ratings
    ("7 - Strongly support" -> 7) are accepted; anything else, NaN and +-inf are NaN and flagged bad.
    Integer columns stay integer (no NaN possible): the engine's histogram path then skips float checks."""
    import pandas as pd

    s = values if isinstance(values, pd.Series) else pd.Series(values)
    if pd.api.types.is_bool_dtype(s) and not s.hasnans:
        return s.to_numpy(dtype=np.int8), None
    if pd.api.types.is_integer_dtype(s) and not s.hasnans:
        return s.to_numpy(), None
    if pd.api.types.is_numeric_dtype(s):
        arr = np.array(s.to_numpy(dtype=float, na_value=np.nan), dtype=float, copy=True)
    else:
        arr = np.array(pd.to_numeric(s, errors="coerce").to_numpy(dtype=float, na_value=np.nan), copy=True)
        miss = ~np.isfinite(arr)
        if miss.any():
            arr[miss] = [_parse_one(v) for v in s[miss].tolist()]
    bad = ~np.isfinite(arr)
    if not bad.any():
        return arr, None
    arr[bad] = np.nan
    return arr, bad


def _parse_one(v) -> float:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) else math.nan
    if isinstance(v, str):
        m = _LABELLED.match(v)
        if m:
            return float(m.group(1))
    return math.nan
