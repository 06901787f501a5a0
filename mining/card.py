"""The dataset card (`README.md` in the dataset dir): where the data came from, what each filter dropped, the
schema, and a few example records (already redacted, so the examples show the PII placeholders)."""

from __future__ import annotations

import json

REASON_HELP = {
    "deleted": "message (or an ancestor turn) deleted by moderators",
    "review_failed": "message (or an ancestor) failed crowd review",
    "spam": "crowd `spam` label >= 0.5",
    "orphan": "a turn of the thread is missing from the export",
    "no_rating": "no rating under the configured mapping",
    "no_assistant_reply": "does not end with a non-empty assistant reply after a user turn",
    "too_short": "assistant reply shorter than `min_chars`",
    "too_long": "conversation longer than `max_chars`",
    "language": "declared language not in `languages`",
    "low_rating": "rating below `min_rating`",
    "duplicate": "same normalised text as a better-rated (or earlier) record",
    "near_duplicate": "MinHash-similar to a better-rated (or earlier) record",
    "identical_pair": "hh-rlhf pair whose chosen and rejected replies are identical",
    "empty_reply": "hh-rlhf pair with an empty reply",
}


def render_card(manifest: dict, examples: list[dict]) -> str:
    c = manifest["counts"]
    cfg = manifest["config"]
    lines = [
        f"# Flywheel dataset `{manifest['version']}`",
        "",
        "Made by `flywheel mine`: rated chat logs curated into SFT conversations (`train.jsonl`, `eval.jsonl`)",
        "and preference pairs (`preferences.jsonl`). Same inputs + config give byte-identical files and the same",
        "version.",
        "",
        "## Sources",
        "",
        "| input | format | sha256 | read | kept | rejected | filtered |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for i in manifest["inputs"]:
        lines.append(f"| `{i['path']}` | {i['format']} | `{i['sha256'][:12]}` | {i['read']} | {i['kept']} | "
                     f"{i['rejected']} | {sum(i['filtered'].values())} |")
    lines += [
        "",
        f"Total: read {c['read']} = kept {c['kept']} + rejected {c['rejected']} + filtered "
        f"{sum(c['filtered'].values())}. Splits: train {manifest['splits']['train']}, eval "
        f"{manifest['splits']['eval']} (hash of the dedupe cluster's conversation id, eval fraction "
        f"{cfg['eval_fraction']}). Preferences: {c['preferences']}.",
        "",
        "## Filters",
        "",
        "| reason | dropped | meaning |",
        "|---|---:|---|",
    ]
    for reason, n in sorted(c["filtered"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| `{reason}` | {n} | {REASON_HELP.get(reason, '')} |")
    if c["rejected"]:
        lines.append(f"| (rejected) | {c['rejected']} | unreadable records, listed in `rejects.jsonl` |")
    pii = c.get("pii") or {}
    lines += [
        "",
        f"Rating threshold: >= {cfg['min_rating']}; oasst rating mapping: `{cfg['oasst_rating']}`; near-dedupe: "
        f"{'MinHash LSH, Jaccard >= ' + str(cfg['dedupe']['threshold']) if cfg['dedupe']['near'] else 'off'}.",
        "PII redacted (typed placeholders `<EMAIL>`, `<PHONE>`, `<CARD>`, `<IBAN>`, `<IP>`): "
        + (", ".join(f"{k} {v}" for k, v in sorted(pii.items())) or "none found")
        + ("" if cfg["redact_pii"] else " (redaction OFF)") + ".",
        "",
        "## Schema",
        "",
        "- `train.jsonl` / `eval.jsonl`: `id`, `messages` [{`role`: system|user|assistant, `content`}] (a system",
        "  message carries the retrieved context when there was one), `rating` (1-5), `source`, `prompt_variant`,",
        "  `context`, `cluster` (the dedupe cluster's representative id).",
        "- `preferences.jsonl`: `id`, `prompt` (messages), `chosen`, `rejected` (one assistant message each),",
        "  `source` (`hh-rlhf`, `<src>:rank`, `<src>:rating_gap`).",
        "- `rejects.jsonl`: `file`, `line`, `reason`, `raw` (cut to 2000 characters).",
        "",
        "## Examples",
        "",
    ]
    for ex in examples[:3]:
        text = json.dumps(ex, ensure_ascii=False, indent=1)
        if len(text) > 1500:
            text = text[:1500] + "\n…"
        lines += ["```json", text, "```", ""]
    if not examples:
        lines.append("(no records kept)")
    return "\n".join(lines).rstrip() + "\n"
