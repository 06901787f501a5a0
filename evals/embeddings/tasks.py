"""Benchmark tasks as plain data, loaded and validated: BEIR retrieval, STS pairs, a domain task from a mined dataset.

Every loader checks its input and raises `InputError` naming the file, line and field, with counts
(`qrels/test.tsv: 3 judgements name unknown documents (first: 'd9' line 4)`): nothing is silently skipped.
What a loader legitimately leaves out (queries without any relevant document, mined records without context) is
counted in `task.info` so the benchmark reports it.

Relevance follows BEIR / trec_eval: a qrels score > 0 is relevant, the score itself is the graded gain for
nDCG; 0 means "judged, not relevant" (Cranfield uses it).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.foundation.errors import InputError
from flywheel.foundation.io import iter_jsonl, sha256_text

# Short names for the shared data sets (relative to the data dir, `../shared/data` by default).
KNOWN_TASKS = {
    "medline": "medline-beir",
    "cranfield": "cranfield-beir",
    "stsb": "stsbenchmark",
}


@dataclass
class RetrievalTask:
    name: str
    corpus: dict[str, str]  # doc id -> text
    queries: dict[str, str]  # query id -> text (only queries with >= 1 relevant doc)
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> graded relevance (> 0 relevant)
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    kind: str = "retrieval"


@dataclass
class PairsTask:
    """Sentence pairs with a gold similarity (STS-B: 0-5). Also the labelled pairs for threshold calibration."""

    name: str
    s1: list[str]
    s2: list[str]
    scores: list[float]
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    kind: str = "sts"
    labels: list[bool] | None = None  # duplicate labels given by the data; None: derived from scores


# ---------------------------------------------------------------- helpers


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    rows = []
    for i, obj in iter_jsonl(path):
        for k in required:
            if k not in obj:
                raise InputError(f"{path}:{i}: missing field {k!r}")
        rows.append((i, obj))
    return rows


def _unique_ids(path: Path, rows: list[tuple[int, dict]]) -> dict[str, tuple[int, dict]]:
    seen: dict[str, tuple[int, dict]] = {}
    dups: list[tuple[str, int]] = []
    for line, obj in rows:
        _id = obj["_id"]
        if not isinstance(_id, (str, int)) or str(_id) == "":
            raise InputError(f"{path}:{line}: _id: must be a non-empty string (got {_id!r})")
        _id = str(_id)
        if _id in seen:
            dups.append((_id, line))
        else:
            seen[_id] = (line, obj)
    if dups:
        first_id, first_line = dups[0]
        raise InputError(f"{path}: {len(dups)} duplicate _id(s) (first: {first_id!r} at line {first_line}, "
                         f"also line {seen[first_id][0]})")
    return seen


def _doc_text(obj: dict, path: Path, line: int) -> str:
    title, text = obj.get("title") or "", obj.get("text")
    if text is None:
        text = ""
    if not isinstance(text, str) or not isinstance(title, str):
        raise InputError(f"{path}:{line}: text/title: must be strings")
    # BEIR embeds "title text". Cranfield's text already starts with its title: do not say it twice.
    if title and not text.startswith(title.strip()):
        return f"{title} {text}".strip()
    return text


def _sample(ids: list[str], n: int | None, seed: int) -> list[str]:
    if n is None or n >= len(ids):
        return ids
    return sorted(random.Random(seed).sample(ids, n), key=ids.index)


# ---------------------------------------------------------------- BEIR


def load_beir(root: str | Path, split: str = "test", *, name: str | None = None, max_docs: int | None = None,
              max_queries: int | None = None, seed: int = 0) -> RetrievalTask:
    """A BEIR directory: `corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv` (header optional, graded scores).

    `max_queries` samples queries (seeded); `max_docs` samples the corpus but always keeps every document judged
    relevant to a kept query, so subsampling makes the task easier, never wrong. Both are recorded in `info`.
    """
    root = Path(root)
    name = name or root.name
    corpus_path, queries_path = root / "corpus.jsonl", root / "queries.jsonl"
    qrels_path = root / "qrels" / f"{split}.tsv"
    docs = _unique_ids(corpus_path, _read_jsonl(corpus_path, ("_id",)))
    if not docs:
        raise InputError(f"{corpus_path}: empty corpus (0 documents)")
    corpus = {i: _doc_text(obj, corpus_path, line) for i, (line, obj) in docs.items()}
    qs = _unique_ids(queries_path, _read_jsonl(queries_path, ("_id", "text")))
    if not qs:
        raise InputError(f"{queries_path}: no queries")
    queries = {}
    for i, (line, obj) in qs.items():
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise InputError(f"{queries_path}:{line}: text: empty query")
        queries[i] = obj["text"]
    qrels, unknown_q, unknown_d = _read_qrels(qrels_path, set(queries), set(corpus))
    if unknown_q or unknown_d:
        parts = []
        if unknown_q:
            parts.append(f"{len(unknown_q)} judgement(s) name unknown queries (first: {unknown_q[0][0]!r} "
                         f"at line {unknown_q[0][1]})")
        if unknown_d:
            parts.append(f"{len(unknown_d)} judgement(s) name unknown documents (first: {unknown_d[0][0]!r} "
                         f"at line {unknown_d[0][1]})")
        raise InputError(f"{qrels_path}: " + "; ".join(parts))
    # Queries with no relevant document cannot score anything: left out, and counted (BEIR does the same).
    judged = {q for q, d in qrels.items() if any(s > 0 for s in d.values())}
    info: dict[str, Any] = {"queries_in_file": len(queries), "queries_without_relevant": len(queries) - len(judged),
                            "docs_in_file": len(corpus)}
    keep_q = _sample([q for q in queries if q in judged], max_queries, seed)
    if not keep_q:
        raise InputError(f"{qrels_path}: no query has a relevant document (score > 0)")
    qrels = {q: {d: s for d, s in qrels[q].items() if s > 0} for q in keep_q}
    if max_docs is not None and max_docs < len(corpus):
        needed = {d for q in keep_q for d in qrels[q]}
        rest = [d for d in corpus if d not in needed]
        extra = set(_sample(rest, max(0, max_docs - len(needed)), seed))
        corpus = {d: t for d, t in corpus.items() if d in needed or d in extra}
        info["docs_sampled"] = len(corpus)
    if max_queries is not None:
        info["queries_sampled"] = len(keep_q)
    info.update(queries=len(keep_q), docs=len(corpus), judgements=sum(len(v) for v in qrels.values()),
                graded=any(s > 1 for v in qrels.values() for s in v.values()))
    return RetrievalTask(name, corpus, {q: queries[q] for q in keep_q}, qrels, str(root), info)


def _read_qrels(path: Path, query_ids: set[str], doc_ids: set[str]):
    if not path.exists():
        raise InputError(f"{path}: file not found")
    qrels: dict[str, dict[str, int]] = {}
    unknown_q: list[tuple[str, int]] = []
    unknown_d: list[tuple[str, int]] = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            cols = line.rstrip("\n").split("\t")
            if i == 1 and cols[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue
            if len(cols) == 4:  # TREC format: qid 0 docid score
                cols = [cols[0], cols[2], cols[3]]
            if len(cols) != 3:
                raise InputError(f"{path}:{i}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                                 f"got {len(cols)}")
            q, d, s = (c.strip() for c in cols)
            try:
                score = int(float(s))
            except ValueError:
                raise InputError(f"{path}:{i}: score: {s!r} is not a number") from None
            if q not in query_ids:
                unknown_q.append((q, i))
                continue
            if d not in doc_ids:
                unknown_d.append((d, i))
                continue
            if d in qrels.setdefault(q, {}):
                raise InputError(f"{path}:{i}: duplicate judgement for query {q!r} and document {d!r}")
            qrels[q][d] = score
    if not qrels and not unknown_q and not unknown_d:
        raise InputError(f"{path}: no judgements")
    return qrels, unknown_q, unknown_d


# ---------------------------------------------------------------- STS-B


def load_sts(root: str | Path, split: str = "dev", *, name: str | None = None, max_pairs: int | None = None,
             seed: int = 0) -> PairsTask:
    """STS benchmark TSV (no header; genre, file, year, id, score, s1, s2 [, extra source fields]).

    `root` is the directory (file `sts-<split>.csv`) or a file. Rows carry quotes unescaped, so the csv module
    reads with QUOTE_NONE and keeps the first 7 fields (197 train rows have 2 extra trailing fields).
    """
    root = Path(root)
    path = root if root.is_file() else root / f"sts-{split}.csv"
    if not path.exists():
        raise InputError(f"{path}: file not found (STS split {split!r})")
    s1, s2, scores = [], [], []
    with open(path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) < 7:
                raise InputError(f"{path}:{i}: expected >= 7 tab-separated fields, got {len(row)}")
            try:
                score = float(row[4])
            except ValueError:
                raise InputError(f"{path}:{i}: score: {row[4]!r} is not a number") from None
            if not 0.0 <= score <= 5.0:
                raise InputError(f"{path}:{i}: score: {score} is outside 0-5")
            s1.append(row[5])
            s2.append(row[6])
            scores.append(score)
    if not scores:
        raise InputError(f"{path}: no sentence pairs")
    info: dict[str, Any] = {"pairs_in_file": len(scores), "split": split}
    if max_pairs is not None and max_pairs < len(scores):
        idx = sorted(random.Random(seed).sample(range(len(scores)), max_pairs))
        s1, s2, scores = [s1[i] for i in idx], [s2[i] for i in idx], [scores[i] for i in idx]
    info["pairs"] = len(scores)
    name = name or (root.name if root.is_dir() else path.stem)
    return PairsTask(name, s1, s2, scores, str(path), info)


def load_pairs(path: str | Path, *, name: str | None = None, max_pairs: int | None = None,
               seed: int = 0) -> PairsTask:
    """Labelled pairs for duplicate / semantic-cache calibration: JSONL with `text1`, `text2` (or `s1`/`s2`,
    `sentence1`/`sentence2`) and `label` (0/1, true/false: is a duplicate) and/or `score` (graded similarity).

    With only labels, Spearman/Pearson are computed against the 0/1 label (a rank-biserial style agreement).
    """
    path = Path(path)
    s1, s2, scores, labels = [], [], [], []
    has_label = has_score = False
    n_label = 0
    for line, obj in _read_jsonl(path, ()):
        a = next((obj[k] for k in ("text1", "s1", "sentence1") if k in obj), None)
        b = next((obj[k] for k in ("text2", "s2", "sentence2") if k in obj), None)
        if not isinstance(a, str) or not isinstance(b, str):
            raise InputError(f"{path}:{line}: text1/text2: two strings required")
        if "label" not in obj and "score" not in obj:
            raise InputError(f"{path}:{line}: missing field 'label' (0/1) or 'score'")
        if "label" in obj:
            if obj["label"] not in (0, 1, True, False):
                raise InputError(f"{path}:{line}: label: {obj['label']!r} is not 0/1")
            has_label = True
            n_label += 1
        if "score" in obj:
            if not isinstance(obj["score"], (int, float)) or isinstance(obj["score"], bool):
                raise InputError(f"{path}:{line}: score: {obj['score']!r} is not a number")
            has_score = True
        s1.append(a)
        s2.append(b)
        labels.append(bool(obj.get("label", False)))
        scores.append(float(obj["score"]) if "score" in obj else float(bool(obj.get("label"))))
    if not s1:
        raise InputError(f"{path}: no pairs")
    if 0 < n_label < len(s1):
        raise InputError(f"{path}: {len(s1) - n_label} of {len(s1)} pairs have no 'label' (label all or none)")
    info: dict[str, Any] = {"pairs_in_file": len(s1), "labels": "given" if has_label else "from score",
                            "has_score": has_score}
    if max_pairs is not None and max_pairs < len(s1):
        idx = sorted(random.Random(seed).sample(range(len(s1)), max_pairs))
        s1, s2, scores, labels = ([x[i] for i in idx] for x in (s1, s2, scores, labels))
    info["pairs"] = len(s1)
    return PairsTask(name or path.stem, s1, s2, scores, str(path), info, labels=labels if has_label else None)


# ---------------------------------------------------------------- domain task from a mined dataset


def load_domain(root: str | Path, *, name: str | None = None, max_queries: int | None = None,
                seed: int = 0) -> RetrievalTask:
    """Questions -> the context that was retrieved for them, from a `flywheel mine` output directory.

    Each record of `train.jsonl` / `eval.jsonl` with a context (the `context` field, else the system message)
    gives a query (its first user message) whose one relevant document is that context. Identical contexts are
    one document, so questions asked about the same passage share it; every context is in the corpus.
    """
    root = Path(root)
    files = [root / f for f in ("train.jsonl", "eval.jsonl") if (root / f).exists()]
    if not files:
        raise InputError(f"{root}: not a mined dataset directory (no train.jsonl or eval.jsonl)")
    corpus: dict[str, str] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    no_context = no_question = 0
    for path in files:
        for line, rec in _read_jsonl(path, ("id", "messages")):
            msgs = rec["messages"]
            if not isinstance(msgs, list):
                raise InputError(f"{path}:{line}: messages: must be a list")
            ctx = rec.get("context")
            if not ctx:
                ctx = next((m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "system"),
                           None)
            question = next((m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "user"),
                            None)
            if not ctx or not isinstance(ctx, str) or not ctx.strip():
                no_context += 1
                continue
            if not question or not isinstance(question, str):
                no_question += 1
                continue
            qid = f"{path.stem}:{rec['id']}"
            if qid in queries:
                raise InputError(f"{path}:{line}: id: duplicate record id {rec['id']!r}")
            did = sha256_text(ctx)[:16]
            corpus[did] = ctx
            queries[qid] = question
            qrels[qid] = {did: 1}
    if not queries:
        raise InputError(f"{root}: no record has both a context and a user question "
                         f"({no_context} without context, {no_question} without question)")
    info: dict[str, Any] = {"records_without_context": no_context, "records_without_question": no_question,
                            "queries_in_file": len(queries)}
    keep = _sample(list(queries), max_queries, seed)
    manifest = root / "manifest.json"
    if manifest.exists():
        try:
            info["dataset_version"] = json.loads(manifest.read_text())["version"]
        except (ValueError, KeyError):
            pass
    info.update(queries=len(keep), docs=len(corpus), judgements=len(keep), graded=False)
    return RetrievalTask(name or f"domain:{root.name}", corpus, {q: queries[q] for q in keep},
                         {q: qrels[q] for q in keep}, str(root), info)


# ---------------------------------------------------------------- resolving a task spec


def resolve_task(spec: str, data_dir: str | Path, *, split: str = "test", sts_split: str = "dev",
                 max_docs: int | None = None, max_queries: int | None = None, max_pairs: int | None = None,
                 seed: int = 0) -> RetrievalTask | PairsTask:
    """`medline` / `cranfield` / `stsb` (under data_dir), or a directory: BEIR, STS or a mined dataset."""
    name = None
    if spec in KNOWN_TASKS:
        name = spec
        path = Path(data_dir) / KNOWN_TASKS[spec]
        if not path.exists():
            raise InputError(f"task {spec!r}: {path} does not exist (set data_dir, or give the task as a path)")
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise InputError(f"task {spec!r}: not a known task ({', '.join(KNOWN_TASKS)}) and not a path")
    if path.is_dir() and (path / "corpus.jsonl").exists():
        return load_beir(path, split, name=name, max_docs=max_docs, max_queries=max_queries, seed=seed)
    is_sts_file = path.is_file() and path.suffix in (".csv", ".tsv")
    if is_sts_file or (path.is_dir() and (path / f"sts-{sts_split}.csv").exists()):
        return load_sts(path, sts_split, name=name, max_pairs=max_pairs, seed=seed)
    if path.is_file() and path.suffix == ".jsonl":
        return load_pairs(path, name=name, max_pairs=max_pairs, seed=seed)
    if path.is_dir() and ((path / "train.jsonl").exists() or (path / "eval.jsonl").exists()):
        return load_domain(path, name=name, max_queries=max_queries, seed=seed)
    raise InputError(f"task {spec!r}: {path} is not a BEIR dir (corpus.jsonl), an STS dir (sts-{sts_split}.csv), "
                     "a labelled pairs .jsonl or a mined dataset (train.jsonl/eval.jsonl)")
