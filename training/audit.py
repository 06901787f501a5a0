"""Tokenization for SFT and the loss-mask audit that checks it before the first step.

Why this exists: with `assistant_only_loss`, TRL asks the chat template for an assistant mask through
`{% generation %}` markers. SmolLM2's ChatML template has none, and TRL 1.16 only knows training variants for a
fixed list of templates (ChatML-as-SmolLM2 is not on it), so out of the box the mask is empty or the run fails;
with other templates the end-of-turn token falls outside the mask and the model never learns to stop. Both look
like a healthy falling loss. So we tokenize ourselves, once, into `input_ids` + `labels` (`-100` = not trained),
hand exactly those tensors to the trainer (TRL uses a `labels` column as is), and audit the same tensors:

- tokens trained per example, examples that train nothing, truncation counts;
- whether the end-of-turn token (`<|im_end|>` for ChatML) is ever trained.

A template without generation markers is replaced by a known training variant only if that variant renders every
example byte-identically to the original; otherwise the mask stays empty and the audit refuses to train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flywheel.foundation.errors import InputError

IGNORE = -100

_SYS = "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
_CHATML_BODY = (
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    # The end-of-turn token sits INSIDE the generation block: it is what teaches the model to stop.
    # The newline after it is outside: at inference generation ends at <|im_end|> and never emits it.
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
)
# Training variants with generation markers for templates TRL 1.16 does not patch. Each is used only after it is
# shown to render the dataset exactly like the tokenizer's own template.
TRAINING_TEMPLATES: dict[str, str] = {
    "smollm2-chatml": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}" + _SYS
        + "{% endif %}" + _CHATML_BODY + "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}" + _CHATML_BODY + "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


def has_generation_markers(template: str | None) -> bool:
    import re

    return bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def training_template(tokenizer: Any, conversations: list[list[dict]], assistant_only_loss: bool = True
                      ) -> tuple[str | None, str]:
    """Pick the template to tokenize with. Returns (template or None for the tokenizer's own, how it was chosen)."""
    own = tokenizer.chat_template
    if isinstance(own, dict):
        own = own.get("default")
    if not assistant_only_loss or has_generation_markers(own):
        return None, "tokenizer template" + (" (has generation markers)" if assistant_only_loss else "")
    probe = conversations[: min(len(conversations), 64)] or [[{"role": "user", "content": "x"},
                                                               {"role": "assistant", "content": "y"}]]
    for name, tmpl in TRAINING_TEMPLATES.items():
        try:
            same = all(tokenizer.apply_chat_template(m, tokenize=False) ==
                       tokenizer.apply_chat_template(m, tokenize=False, chat_template=tmpl) for m in probe)
        except Exception:  # noqa: BLE001 - a template that cannot render this data is simply not a match
            same = False
        if same:
            return tmpl, f"{name} training variant (renders identically, adds generation markers)"
    return None, "tokenizer template WITHOUT generation markers (no known training variant matches)"


@dataclass
class Tokenized:
    rows: list[dict]                 # {"input_ids", "labels"} exactly as the trainer gets them
    full_trained: list[int]          # trained tokens per example before truncation (audit: broken masks)
    ids: list[str]
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_truncated_to_nothing: int = 0
    lengths: list[int] = field(default_factory=list)


def tokenize_conversations(records: list[dict], tokenizer: Any, chat_template: str | None, max_length: int,
                           overlong: str = "truncate", assistant_only_loss: bool = True) -> Tokenized:
    """Records -> `input_ids` + `labels`, truncating (keep the start) or dropping over-long examples, counted."""
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
    out = Tokenized(rows=[], full_trained=[], ids=[])
    for i, rec in enumerate(records):
        enc = tokenizer.apply_chat_template(rec["messages"], chat_template=chat_template, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=assistant_only_loss)
        ids = list(enc["input_ids"])
        mask = list(enc["assistant_masks"]) if assistant_only_loss else [1] * len(ids)
        labels = [t if m else IGNORE for t, m in zip(ids, mask)]
        out.full_trained.append(sum(1 for x in labels if x != IGNORE))
        out.ids.append(str(rec.get("id", i)))
        if len(ids) > max_length:
            if overlong == "drop":
                out.dropped_overlong += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            out.truncated += 1
            if out.full_trained[-1] and all(x == IGNORE for x in labels):
                # The answer starts past max_length: nothing left to learn from. Dropped and counted; the
                # refusal below is for masks that are empty before truncation (a template problem).
                out.dropped_truncated_to_nothing += 1
                continue
        out.rows.append({"input_ids": ids, "labels": labels})
        out.lengths.append(len(ids))
    return out


def eot_token_id(tokenizer: Any, eot_token: str | None = None) -> tuple[str, int]:
    tok = eot_token or tokenizer.eos_token
    tid = tokenizer.convert_tokens_to_ids(tok)
    if tid is None or tid == tokenizer.unk_token_id:
        raise InputError(f"eot_token: {tok!r} is not a token of this tokenizer")
    return tok, int(tid)


def audit(tok_train: Tokenized, tokenizer: Any, template_note: str, eot_token: str | None = None,
          tok_eval: Tokenized | None = None) -> dict:
    """The loss-mask report. Pure data; `check_audit` decides whether training may start."""
    eot, eot_id = eot_token_id(tokenizer, eot_token)
    trained = [sum(1 for x in r["labels"] if x != IGNORE) for r in tok_train.rows]
    eot_in_input = sum(r["input_ids"].count(eot_id) for r in tok_train.rows)
    eot_trained = sum(1 for r in tok_train.rows for x in r["labels"] if x == eot_id)
    examples_eot_trained = sum(1 for r in tok_train.rows if eot_id in r["labels"])
    zero = [i for i, n in zip(tok_train.ids, tok_train.full_trained) if n == 0]
    total = sum(len(r["input_ids"]) for r in tok_train.rows)
    report = {
        "template": template_note,
        "examples": len(tok_train.ids),
        "examples_used": len(tok_train.rows),
        "tokens_total": total,
        "tokens_trained": sum(trained),
        "trained_fraction": round(sum(trained) / total, 4) if total else 0.0,
        "trained_per_example": {"min": min(trained, default=0), "mean": round(sum(trained) / len(trained), 1)
                                if trained else 0.0, "max": max(trained, default=0)},
        "zero_trained_examples": len(zero),
        "zero_trained_ids": zero[:10],
        "eot_token": eot,
        "eot_in_input": eot_in_input,
        "eot_trained": eot_trained,
        "examples_with_eot_trained": examples_eot_trained,
        "truncated": tok_train.truncated,
        "dropped_overlong": tok_train.dropped_overlong,
        "dropped_truncated_to_nothing": tok_train.dropped_truncated_to_nothing,
        "max_length_seen": max(tok_train.lengths, default=0),
    }
    if tok_eval is not None:
        report["eval"] = {"examples": len(tok_eval.ids), "examples_used": len(tok_eval.rows),
                          "truncated": tok_eval.truncated, "dropped_overlong": tok_eval.dropped_overlong,
                          "dropped_truncated_to_nothing": tok_eval.dropped_truncated_to_nothing}
    report["problems"] = audit_problems(report)
    report["ok"] = not report["problems"]
    return report


def audit_problems(report: dict) -> list[str]:
    problems = []
    if report["zero_trained_examples"]:
        problems.append(
            f"{report['zero_trained_examples']} of {report['examples']} examples train on no token at all "
            f"(e.g. id {report['zero_trained_ids'][0]}): the chat template has no {{% generation %}} markers, so "
            f"the assistant mask is empty [{report['template']}]. Set assistant_only_loss=false, or set "
            f"chat_template to a template with generation markers")
    elif report["examples_used"] == 0:
        problems.append("no example left to train on after truncation/dropping (raise max_length?)")
    if report["examples_used"] and report["eot_trained"] == 0:
        problems.append(
            f"the end-of-turn token {report['eot_token']!r} is never trained (it occurs {report['eot_in_input']} "
            f"times in the inputs, always masked): the model would never learn to stop. Put it inside the "
            f"template's generation block, or set assistant_only_loss=false")
    return problems


def check_audit(report: dict) -> None:
    if report["problems"]:
        raise InputError("loss-mask audit refused to train: " + "; ".join(report["problems"]))


def render_masked(row: dict, tokenizer: Any, max_tokens: int = 400) -> str:
    """One example as text with masked (untrained) spans in [[ ]], like `axolotl preprocess --debug`."""
    parts, cur, cur_masked = [], [], None
    for tid, lab in list(zip(row["input_ids"], row["labels"]))[:max_tokens]:
        masked = lab == IGNORE
        if cur_masked is not None and masked != cur_masked:
            parts.append((cur_masked, tokenizer.decode(cur)))
            cur = []
        cur.append(tid)
        cur_masked = masked
    if cur:
        parts.append((cur_masked, tokenizer.decode(cur)))
    return "".join(f"[[{t}]]" if m else t for m, t in parts)
