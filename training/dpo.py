"""DPO on preference pairs: load and check the pairs, tokenize them exactly as the trainer will, audit, train.

Pairs are TRL's conversational preference format, as `flywheel mine` writes them to `preferences.jsonl`:
`{"id", "prompt": [messages], "chosen": [assistant message], "rejected": [assistant message], "source"}`.

Choices:
- The reference model is the base with the adapter disabled: `DPOTrainer` keeps `ref_model=None` when it gets a PEFT
  model and computes the reference log-probabilities under `disable_adapter()`, so there is no second copy of the
  weights in memory. With `init_adapter` the policy starts from that adapter; the reference stays the base.
- Pairs are tokenized here (the same prompt / prompt+completion split as TRL's own `_prepare_dataset`) with
  separate budgets: the prompt keeps its end (nearest the answer, `max_prompt_length`), each completion its start
  (`max_completion_length`). The trainer takes these rows as they are, so the audit sees what the loss sees.
- Eval pairs: a separate preference eval split when the dataset has one, else a deterministic share held out by
  prompt hash (all pairs of one prompt land on the same side, so no prompt is both trained and evaluated on).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from flywheel.foundation.errors import InputError
from flywheel.foundation.io import iter_jsonl
from flywheel.mining.dataset import open_dataset
from flywheel.training.backends import Backend
from flywheel.training.data import _content_hash
from flywheel.training.sft import SFTParams, load_model, trainer_args

PAIR_FIELDS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant")


@dataclass
class PreferenceDataset:
    train: list[dict]
    eval: list[dict]
    path: Path
    version: str
    eval_source: str                 # "file <name>" or "held out by prompt hash (<fraction>)"
    files: dict[str, str] = field(default_factory=dict)

    def eval_conversations(self) -> list[dict]:
        """Eval pairs as chat records (prompt + chosen answer), for the base-vs-adapter generations table."""
        return [{"messages": p["prompt"] + p["chosen"]} for p in self.eval]


def load_preference_dataset(path: str | Path, eval_fraction: float = 0.1) -> PreferenceDataset:
    """A mined dataset directory with preferences.jsonl (and maybe a preference eval split), or one .jsonl file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p}: dataset does not exist (give a `flywheel mine` output directory or a .jsonl file)")
    manifest = None
    if p.is_dir():
        try:
            ds = open_dataset(p, need=("preferences",))
        except InputError as e:
            raise InputError(f"{e} - method=dpo trains on preference pairs, which `flywheel mine` writes when the "
                             "logs hold ratings of several answers to one prompt") from None
        manifest = ds.manifest
        files = {s: f for s, f in ds.files.items() if "preference" in s}
    else:
        files = {"preferences": p}
    train = read_pairs(files["preferences"])
    eval_split = next((s for s in files if s != "preferences"), None)
    if eval_split:
        evals, source = read_pairs(files[eval_split], allow_empty=True), f"file {files[eval_split].name}"
    else:
        train, evals = holdout_by_prompt(train, eval_fraction)
        source = f"held out by prompt hash ({eval_fraction:g})"
    version = (manifest or {}).get("version") or _content_hash([Path(f) for f in files.values()])
    return PreferenceDataset(train=train, eval=evals, path=p.resolve(), version=str(version), eval_source=source,
                             files={s: str(f) for s, f in files.items()})


def read_pairs(path: str | Path, allow_empty: bool = False) -> list[dict]:
    path = Path(path)
    pairs = []
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        for k in PAIR_FIELDS:
            _check_messages(rec.get(k), k, where, completion=k != "prompt")
        pairs.append(rec)
    if not pairs and not allow_empty:
        raise InputError(f"{path}: no preference pairs (the file is empty)")
    return pairs


def _check_messages(msgs: Any, key: str, where: str, completion: bool) -> None:
    if msgs is None:
        raise InputError(f"{where}: {key}: missing (a pair needs prompt, chosen and rejected)")
    if not isinstance(msgs, list) or not msgs:
        raise InputError(f"{where}: {key}: must be a non-empty list of messages (TRL conversational format)")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: {key}[{i}]: must be {{'role': one of {'/'.join(ROLES)}, 'content': text}}")
    if completion and msgs[-1]["role"] != "assistant":
        raise InputError(f"{where}: {key}[-1].role: a completion ends with an assistant message")


def holdout_by_prompt(pairs: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, eval): a pair is eval when its prompt's hash falls in the first `fraction` of the hash space."""
    train, evals = [], []
    for p in pairs:
        h = hashlib.sha256(json.dumps(p["prompt"], sort_keys=True, ensure_ascii=False).encode()).digest()
        (evals if int.from_bytes(h[:8], "big") / 2 ** 64 < fraction else train).append(p)
    return train, evals


# -- tokenization and the pair audit -------------------------------------------------------------------------

def _ids(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> list[int]:
    enc = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=True)
    return list(enc["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _prompt_tail(tokenizer: Any, role: str) -> int:
    """Template tokens after the last prompt message's content (its end-of-turn + the generation header): a prompt
    that keeps no more tokens than this has lost all of its last message."""
    sentinel = "\u2063FLYWHEEL\u2063"
    text = tokenizer.apply_chat_template([{"role": role, "content": sentinel}], tokenize=False,
                                         add_generation_prompt=True)
    tail = text[text.index(sentinel) + len(sentinel):]
    return len(tokenizer(tail, add_special_tokens=False)["input_ids"])


def tokenize_pairs(pairs: list[dict], tokenizer: Any, max_prompt_length: int, max_completion_length: int
                   ) -> tuple[list[dict], list[dict]]:
    """Rows for the trainer ({prompt_ids, chosen_ids, rejected_ids}) and per-pair facts for the audit."""
    rows, facts = [], []
    tails: dict[str, int] = {}
    for p in pairs:
        prompt = _ids(tokenizer, p["prompt"], True)
        full_c = _ids(tokenizer, p["prompt"] + p["chosen"], False)
        full_r = _ids(tokenizer, p["prompt"] + p["rejected"], False)
        n = min(_common_prefix(prompt, full_c), _common_prefix(prompt, full_r))
        role = p["prompt"][-1]["role"]
        if role not in tails:
            tails[role] = _prompt_tail(tokenizer, role)
        prompt_ids = prompt[:n][-max_prompt_length:]
        chosen, rejected = full_c[n:], full_r[n:]
        row = {"prompt_ids": prompt_ids, "chosen_ids": chosen[:max_completion_length],
               "rejected_ids": rejected[:max_completion_length]}
        rows.append(row)
        facts.append({
            "prompt_tokens": n, "chosen_tokens": len(chosen), "rejected_tokens": len(rejected),
            "same_text": _text(p["chosen"]) == _text(p["rejected"]),
            "same_after_truncation": row["chosen_ids"] == row["rejected_ids"],
            "prompt_truncated": n > max_prompt_length,
            "prompt_cut_to_nothing": len(prompt_ids) <= tails[role],
            "chosen_truncated": len(chosen) > max_completion_length,
            "rejected_truncated": len(rejected) > max_completion_length,
            "chosen_empty": not _text(p["chosen"]), "rejected_empty": not _text(p["rejected"]),
        })
    return rows, facts


def _text(msgs: list[dict]) -> str:
    return "\n".join(m["content"] for m in msgs).strip()


# What makes a pair useless; the audit refuses to train when any of these is the majority.
REFUSALS = {
    "identical_pairs": ("chosen equals rejected (as text, or in the tokens kept)",
                        lambda f: f["same_text"] or f["same_after_truncation"]),
    "prompts_cut_to_nothing": ("prompt truncated to nothing of its last message (raise max_prompt_length)",
                               lambda f: f["prompt_cut_to_nothing"]),
    "chosen_empty": ("chosen answer empty", lambda f: f["chosen_empty"]),
    "rejected_empty": ("rejected answer empty", lambda f: f["rejected_empty"]),
}


def pair_audit(facts: list[dict], max_prompt_length: int, max_completion_length: int,
               eval_facts: Sequence[dict] = (), eval_source: str = "") -> dict:
    """Counts, length distributions and the verdict for a set of tokenized pairs."""
    n = len(facts)
    report: dict[str, Any] = {"pairs": n, "eval_pairs": len(eval_facts), "eval_source": eval_source,
                              "max_prompt_length": max_prompt_length,
                              "max_completion_length": max_completion_length}
    for key, (_, bad) in REFUSALS.items():
        report[key] = sum(1 for f in facts if bad(f))
    for key in ("prompt_truncated", "chosen_truncated", "rejected_truncated"):
        report[key] = sum(1 for f in facts if f[key])
    report["lengths"] = {part: _distribution([f[f"{part}_tokens"] for f in facts])
                         for part in ("prompt", "chosen", "rejected")}
    problems = []
    if n == 0:
        problems.append("no training pairs")
    for key, (what, _) in REFUSALS.items():
        if n and report[key] * 2 > n:
            problems.append(f"{report[key]}/{n} pairs: {what}")
    report["problems"] = problems
    report["ok"] = not problems
    return report


def _distribution(xs: list[int]) -> dict:
    if not xs:
        return {}
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731 - nearest-rank percentile
    return {"min": s[0], "p50": pick(0.5), "p90": pick(0.9), "max": s[-1], "mean": round(sum(s) / len(s), 1)}


def check_pair_audit(report: dict) -> None:
    if not report["ok"]:
        raise InputError("pair audit: " + "; ".join(report["problems"]) + " (see `flywheel train --dry-run`)")


# -- the trainer ---------------------------------------------------------------------------------------------

@dataclass
class DPOParams(SFTParams):
    beta: float = 0.1
    loss_type: str = "sigmoid"
    max_prompt_length: int = 256
    max_completion_length: int = 256
    init_adapter_dir: str | None = None   # start from this adapter; None = a fresh LoRA


def dpo_config(params: DPOParams, backend: Backend, has_eval: bool):
    from trl import DPOConfig

    return DPOConfig(
        **trainer_args(params, backend, has_eval),
        beta=params.beta,
        loss_type=[params.loss_type],
        # rows come truncated to these budgets; the collator's total cap is then a no-op
        max_length=params.max_prompt_length + params.max_completion_length,
        precompute_ref_log_probs=False,       # the reference is the base under disable_adapter(): nothing to cache
        dataset_num_proc=None,
    )


def build_dpo_trainer(params: DPOParams, backend: Backend, tokenizer: Any, train_rows: list[dict],
                      eval_rows: list[dict] | None, callbacks: Sequence[Any] = ()):
    """TRL's DPOTrainer on pre-tokenized rows, with a PEFT policy and no separate reference model."""
    from datasets import Dataset
    from trl import DPOTrainer

    params.max_length = params.max_prompt_length + params.max_completion_length
    model, peft_config = load_model(params, backend, tokenizer)
    if params.init_adapter_dir:
        if peft_config is None:  # Unsloth has already wrapped the model in a fresh LoRA
            raise InputError("init_adapter: starting DPO from an adapter is supported with backend=trl only")
        from peft import PeftModel

        model, peft_config = PeftModel.from_pretrained(model, params.init_adapter_dir, is_trainable=True), None

    class _PreTokenized(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # tokenized and truncated by tokenize_pairs, and audited as such

    trainer = _PreTokenized(model=model, ref_model=None, args=dpo_config(params, backend, bool(eval_rows)),
                            train_dataset=Dataset.from_list(train_rows),
                            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
                            processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def reward_history(trainer: Any) -> list[dict]:
    """Eval reward accuracy and margin at each eval step (TRL logs them as eval_rewards/*)."""
    return [{"step": h["step"], "accuracy": h["eval_rewards/accuracies"], "margin": h.get("eval_rewards/margins")}
            for h in trainer.state.log_history if "eval_rewards/accuracies" in h]

