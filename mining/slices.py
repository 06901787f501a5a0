"""New bytes of append-only logs: what the scheduled loop (`flywheel run`) mines on each pass.

For each input log file the loop's state remembers how many bytes were consumed and the hash of that prefix.
Appended lines (complete lines only: a line being written stays for next time) are new; a file whose consumed
prefix changed was rewritten and counts as new in full. A binary table (Parquet) or CSV is unchanged or new in
full. Which files count as logs is the readers' own definition (`readers.is_data_file`), so the loop never slices
a file that `flywheel mine` then refuses.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flywheel.foundation.errors import InputError
from flywheel.mining.readers import LINE_SUFFIXES, is_data_file


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Log files named by `inputs` (a folder: its data files, recursively, sorted), resolved."""
    files: list[Path] = []
    for s in inputs:
        p = Path(s).expanduser()
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.is_file() and is_data_file(q))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"inputs: {s}: no such file or directory")
    if not files:
        raise InputError(f"inputs: no log files in {inputs or '[] (set inputs=[path])'}")
    return [f.resolve() for f in files]


def prefix_sha(path: Path, n: int) -> str:
    """sha256 of the first `n` bytes of `path`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = n
        while left > 0 and (block := f.read(min(1 << 20, left))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def new_slices(files: list[Path], state: dict) -> list[dict]:
    """For each file: {path, start, end, reason} of bytes not consumed yet (complete lines only)."""
    out = []
    seen = state.get("files", {})
    for f in files:
        size = f.stat().st_size
        rec = seen.get(str(f))
        start, reason = 0, "new file"
        if rec:
            if size >= rec["bytes"] and prefix_sha(f, rec["bytes"]) == rec["sha256"]:
                start, reason = rec["bytes"], "appended"
            else:
                reason = "rewritten"
        end = size
        line_log = f.suffix.lower() in LINE_SUFFIXES
        if line_log and end > start:
            with open(f, "rb") as fh:  # stop at the last newline: a line still being written waits
                fh.seek(start)
                chunk = fh.read(end - start)
            cut = chunk.rfind(b"\n")
            end = start + cut + 1 if cut >= 0 else start
        elif not line_log and rec and reason == "appended":
            end = start = size  # a binary table is either unchanged or new in full
        if end > start:
            out.append({"path": str(f), "start": start, "end": end, "reason": reason})
    return out


def write_slices(slices: list[dict], batch_dir: Path) -> list[str]:
    """Copy the new byte ranges into `batch_dir` (one file per source, original suffix kept)."""
    from flywheel.foundation.io import atomic_dir

    written = []
    with atomic_dir(batch_dir, inputs=[s["path"] for s in slices], stage="run") as tmp:
        for i, s in enumerate(slices):
            src = Path(s["path"])
            dst = tmp / f"{i:03d}-{src.name}"
            with open(src, "rb") as fi, open(dst, "wb") as fo:
                fi.seek(s["start"])
                fo.write(fi.read(s["end"] - s["start"]))
            written.append(dst.name)
    return [str(batch_dir / w) for w in written]
