"""Training throughput: `flywheel train`'s path vs a plain TRL script with identical settings, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_train.py [--steps 8] [--repeats 2] [--max-length 256]

Both sides train the same base (the dequantized SmolLM2 from `flywheel.training.models`), the same conversations
(a slice of `flywheel mine` output on ../shared/data/oasst1-en-validation, or synthetic ones without it), with
the same LoRA / batch / max_length / optimizer settings, each in its own subprocess (so peak RSS is per side),
interleaved A B A B to share the machine's noise. Throughput = non-padding tokens seen / `train_runtime`.
The plain TRL side tokenizes `messages` with the tokenizer's own template and trains every token; flywheel
trains assistant tokens only (same input_ids, same compute: the mask changes the loss, not the FLOPs).
Target: flywheel >= 0.95x plain TRL. Writes bench/results/train.json.
GPU (Unsloth vs TRL, peak GPU memory, MFU) is measured only when a GPU is lent; see the `gpu` entry.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_train.py --method dpo [--steps 6] [--repeats 2]
        [--max-prompt-length 128] [--max-completion-length 64]

DPO: `flywheel train method=dpo` vs a plain TRL `DPOTrainer` script (PEFT LoRA, ref_model=None, same knobs) on the
same pairs (`flywheel mine` on ../shared/data/hh-rlhf-harmless-base-test). Only pairs that fit both length budgets
untruncated are used, so flywheel's pre-tokenized rows and TRL's own tokenization are the same tokens; throughput =
policy tokens (prompt+chosen and prompt+rejected, no padding) / `train_runtime`. Peak RSS is compared with a child
that only imports the stack and loads the model once: a second (reference) model copy would add its weights' size.
Writes bench/results/train-dpo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OASST = ROOT.parent / "shared" / "data" / "oasst1-en-validation"

COMMON = dict(lora_r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lr=2e-4,
              batch_size=2, seed=0)


def make_dataset(out: Path, n: int) -> str:
    """Mine the real oasst slice when present (the data `flywheel train` sees in practice), else synthesize."""
    if OASST.exists():
        try:
            from flywheel.pipelines.mine import MineConfig, run_mine  # another stage; optional for the bench

            run_mine([str(OASST)], out, MineConfig())
            return f"flywheel mine {OASST.name}"
        except Exception as e:  # noqa: BLE001 - fall back to synthetic data rather than no bench
            print(f"(mine failed: {e!r}; using synthetic data)", file=sys.stderr)
    from tests.training.conftest import write_dataset

    write_dataset(out, n_train=n, n_eval=4)
    return "synthetic capitals"


def cpu_clock():
    """A TrainerCallback timing train() in process CPU seconds: on a shared machine, waiting for a core inflates
    wall time at random; CPU time per token is what the two code paths actually cost (OMP_NUM_THREADS=1)."""
    from transformers import TrainerCallback

    class CpuClock(TrainerCallback):
        cpu_s = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.process_time()

        def on_train_end(self, args, state, control, **kw):
            self.cpu_s = time.process_time() - self.t0

    return CpuClock()


def child_flywheel(data: str, steps: int, max_length: int, out: str) -> dict:
    from flywheel.pipelines.train import TrainConfig, run_train

    cfg = TrainConfig.model_validate({
        "dataset": data, "max_steps": steps, "batch_size": COMMON["batch_size"], "max_length": max_length,
        "learning_rate": COMMON["lr"], "lora": {"r": COMMON["lora_r"], "alpha": COMMON["lora_alpha"],
                                                "target_modules": COMMON["target_modules"]},
        "eval_every": 0, "save_every": 10_000, "generations": 0, "seed": COMMON["seed"], "backend": "trl",
        "output_dir": out, "max_train_examples": steps * COMMON["batch_size"]})
    clock = cpu_clock()
    r = run_train(cfg, callbacks=[clock])
    return {"tokens": r["tokens_seen"], "train_runtime_s": r["runtime_s"], "train_cpu_s": clock.cpu_s,
            "final_loss": r["final_loss"]}


def child_trl(data: str, steps: int, max_length: int, out: str) -> dict:
    """The plain TRL script a user would write: SFTTrainer on `messages`, PEFT LoraConfig, same knobs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from flywheel.training.models import resolve_base_model

    path = str(resolve_base_model("smollm2-135m-instruct").path)
    ds = load_dataset("json", data_files=str(Path(data) / "train.jsonl"), split="train")
    ds = ds.select(range(min(len(ds), steps * COMMON["batch_size"]))).select_columns(["messages"])
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=COMMON["batch_size"],
                     learning_rate=COMMON["lr"], max_length=max_length, logging_steps=1, save_strategy="no",
                     report_to="none", use_cpu=True, activation_checkpointing=False, bf16=False,
                     optim="adamw_torch", seed=COMMON["seed"], data_seed=COMMON["seed"], disable_tqdm=True,
                     include_num_input_tokens_seen="non_padding", dataloader_num_workers=0)
    peft = LoraConfig(r=COMMON["lora_r"], lora_alpha=COMMON["lora_alpha"], target_modules=COMMON["target_modules"],
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    clock = cpu_clock()
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft,
                         callbacks=[clock])
    res = trainer.train()
    return {"tokens": trainer.state.num_input_tokens_seen, "train_runtime_s": res.metrics["train_runtime"],
            "train_cpu_s": clock.cpu_s,
            "final_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]}


# -- DPO ------------------------------------------------------------------------------------------------------

HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test"
DPO = dict(beta=0.1, lr=5e-5)


def make_pairs(out: Path, n: int, max_prompt: int, max_completion: int) -> dict:
    """Mined hh-rlhf pairs that fit both budgets untruncated: n for training, 2 as the (unused) eval split."""
    from transformers import AutoTokenizer

    from flywheel.pipelines.mine import MineConfig, run_mine
    from flywheel.training.dpo import read_pairs, tokenize_pairs
    from flywheel.training.models import resolve_base_model

    if not HH.exists():
        raise SystemExit(f"{HH} is missing: the DPO bench needs the hh-rlhf pairs")
    mined = out.parent / "mined"
    run_mine([str(HH)], mined, MineConfig())
    tok = AutoTokenizer.from_pretrained(str(resolve_base_model("smollm2-135m-instruct").path))
    pairs = read_pairs(mined / "preferences.jsonl")
    rows, facts = tokenize_pairs(pairs, tok, max_prompt, max_completion)
    fit = [i for i, f in enumerate(facts) if not (f["prompt_truncated"] or f["chosen_truncated"]
                                                  or f["rejected_truncated"] or f["same_after_truncation"])]
    if len(fit) < n + 2:
        raise SystemExit(f"only {len(fit)} pairs fit {max_prompt}+{max_completion} tokens; raise the budgets")
    out.mkdir(parents=True)
    for name, idx in (("preferences", fit[:n]), ("preferences_eval", fit[n:n + 2])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(pairs[i]) + "\n" for i in idx), encoding="utf-8")
    tokens = sum(2 * len(rows[i]["prompt_ids"]) + len(rows[i]["chosen_ids"]) + len(rows[i]["rejected_ids"])
                 for i in fit[:n])
    return {"source": f"flywheel mine {HH.name}", "pairs": n, "fitting_pairs": len(fit), "mined_pairs": len(pairs),
            "policy_tokens": tokens}


def child_flywheel_dpo(data: str, steps: int, max_prompt: int, max_completion: int, out: str) -> dict:
    from flywheel.pipelines.train import TrainConfig, run_train

    cfg = TrainConfig.model_validate({
        "method": "dpo", "dataset": data, "max_steps": steps, "batch_size": COMMON["batch_size"], "grad_accum": 1,
        "max_prompt_length": max_prompt, "max_completion_length": max_completion, "beta": DPO["beta"],
        "learning_rate": DPO["lr"], "lora": {"r": COMMON["lora_r"], "alpha": COMMON["lora_alpha"],
                                             "target_modules": COMMON["target_modules"]},
        "eval_every": 0, "save_every": 10_000, "generations": 0, "seed": COMMON["seed"], "backend": "trl",
        "output_dir": out})
    clock = cpu_clock()
    r = run_train(cfg, callbacks=[clock])
    return {"train_runtime_s": r["runtime_s"], "train_cpu_s": clock.cpu_s, "final_loss": r["final_loss"]}


def child_trl_dpo(data: str, steps: int, max_prompt: int, max_completion: int, out: str) -> dict:
    """The plain TRL script a user would write: DPOTrainer on the conversational pairs, PEFT LoraConfig,
    ref_model=None (the reference is the base under disable_adapter()), same knobs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from flywheel.training.models import resolve_base_model

    path = str(resolve_base_model("smollm2-135m-instruct").path)
    ds = load_dataset("json", data_files=str(Path(data) / "preferences.jsonl"), split="train")
    ds = ds.select_columns(["prompt", "chosen", "rejected"])
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    args = DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=COMMON["batch_size"],
                     learning_rate=DPO["lr"], beta=DPO["beta"], loss_type=["sigmoid"],
                     max_length=max_prompt + max_completion, precompute_ref_log_probs=False, logging_steps=1,
                     save_strategy="no", report_to="none", use_cpu=True, activation_checkpointing=False, bf16=False,
                     optim="adamw_torch", seed=COMMON["seed"], data_seed=COMMON["seed"], disable_tqdm=True,
                     dataloader_num_workers=0)
    peft = LoraConfig(r=COMMON["lora_r"], lora_alpha=COMMON["lora_alpha"], target_modules=COMMON["target_modules"],
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    clock = cpu_clock()
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=peft, callbacks=[clock])
    res = trainer.train()
    return {"train_runtime_s": res.metrics["train_runtime"], "train_cpu_s": clock.cpu_s,
            "final_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]}


def child_load(*_: Any) -> dict:
    """The floor: the same imports and one copy of the model, no training."""
    import torch
    import trl  # noqa: F401 - the stack both sides import
    from transformers import AutoModelForCausalLM

    from flywheel.training.models import resolve_base_model

    model = AutoModelForCausalLM.from_pretrained(str(resolve_base_model("smollm2-135m-instruct").path),
                                                 dtype=torch.float32)
    return {"model_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20, 1)}


def run_child(side: str, data: str, steps: int, max_length: int, extra: Sequence[str] = (),
              tokens: int | None = None) -> dict:
    """One side in its own process (peak RSS is per side). `tokens`: the side's token count when the trainer does
    not count it the same way on both sides (DPO)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as tmp:
        env = {**os.environ, "FLYWHEEL_HOME": str(Path(tmp) / ".flywheel"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{Path(tmp) / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        t = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", side, "--data", data, "--steps", str(steps),
                              "--max-length", str(max_length), "--out", str(Path(tmp) / "out"), *extra],
                             env=env, capture_output=True, text=True, cwd=tmp)
        if out.returncode != 0:
            raise RuntimeError(f"{side} child failed:\n{out.stderr[-3000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        res["wall_s"] = round(time.perf_counter() - t, 1)
        if "train_runtime_s" not in res:  # the load-only floor
            return res
        if tokens is not None:
            res["tokens"] = tokens
        res["tokens_per_s"] = res["tokens"] / res["train_runtime_s"]
        res["tokens_per_cpu_s"] = res["tokens"] / res["train_cpu_s"]
        return res


def interleave(repeats: int, run) -> dict[str, list[dict]]:  # noqa: ANN001 - run(side) -> result
    """A B A B: both sides share the machine's noise."""
    runs: dict[str, list[dict]] = {"trl": [], "flywheel": []}
    for i in range(repeats):
        for side in (("trl", "flywheel") if i % 2 == 0 else ("flywheel", "trl")):
            r = run(side)
            runs[side].append(r)
            print(f"{side:8s} run {i + 1}: {r['tokens_per_s']:.1f} tokens/s wall, {r['tokens_per_cpu_s']:.1f} "
                  f"tokens/CPU-s ({r['tokens']} tokens in {r['train_runtime_s']:.1f} s wall, "
                  f"{r['train_cpu_s']:.1f} s CPU), peak RSS {r['peak_rss_mb']:.0f} MB, loss {r['final_loss']:.3f}")
    return runs


def summarize(runs: dict[str, list[dict]], repeats: int) -> dict:
    med = {s: statistics.median(r["tokens_per_s"] for r in rs) for s, rs in runs.items()}
    med_cpu = {s: statistics.median(r["tokens_per_cpu_s"] for r in rs) for s, rs in runs.items()}
    ratio = med["flywheel"] / med["trl"]
    ratio_cpu = med_cpu["flywheel"] / med_cpu["trl"]
    print(f"flywheel / plain TRL: {ratio:.3f}x tokens/s wall, {ratio_cpu:.3f}x tokens per CPU-second "
          f"(median of {repeats}; target >= 0.95x)")
    return {"flywheel_tokens_per_s": round(med["flywheel"], 2), "trl_tokens_per_s": round(med["trl"], 2),
            "ratio_flywheel_over_trl": round(ratio, 3),
            "flywheel_tokens_per_cpu_s": round(med_cpu["flywheel"], 2),
            "trl_tokens_per_cpu_s": round(med_cpu["trl"], 2), "ratio_cpu_time": round(ratio_cpu, 3),
            "target": 0.95, "meets_target_wall": ratio >= 0.95, "meets_target_cpu_time": ratio_cpu >= 0.95,
            "peak_rss_mb": {s: max(r["peak_rss_mb"] for r in rs) for s, rs in runs.items()}, "runs": runs}


MEMORY_NOTE = ("both sides keep ref_model=None (the reference is the base under disable_adapter()), so the two peak "
               "RSS agree; a second fp32 model copy would add load_only.model_mb. rss_over_one_model_load_mb is what "
               "training adds over importing torch+trl and loading the model once: the trainer stack's imports, "
               "AdamW for the LoRA weights, and activations incl. the 49k-vocab logits of 4 sequences per step, for "
               "the policy and the reference pass")
MACHINE_NOTE = ("2 cores shared with other engineers' jobs: absolute numbers are noisy, the ratio is measured "
                "interleaved in one run")
CHILDREN = {("sft", "flywheel"): child_flywheel, ("sft", "trl"): child_trl, ("dpo", "flywheel"): child_flywheel_dpo,
            ("dpo", "trl"): child_trl_dpo, ("dpo", "load"): child_load}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["sft", "dpo"], default="sft")
    ap.add_argument("--child", choices=["flywheel", "trl", "load"])
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=128, help="dpo")
    ap.add_argument("--max-completion-length", type=int, default=64, help="dpo")
    a = ap.parse_args()
    if a.child:
        fn = CHILDREN[(a.method, a.child)]
        lengths = (a.max_prompt_length, a.max_completion_length) if a.method == "dpo" else (a.max_length,)
        res = fn(a.data, a.steps, *lengths, a.out)
        res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(res))
        return

    from flywheel.training.models import resolve_base_model

    resolve_base_model("smollm2-135m-instruct")  # build the cache outside the timed children
    (main_dpo if a.method == "dpo" else main_sft)(a)


def _write(name: str, result: dict) -> None:
    out = ROOT / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


def main_sft(a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        os.environ["FLYWHEEL_HOME"] = str(Path(tmp) / ".flywheel")  # the mine run's MLflow store stays in tmp
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / '.flywheel' / 'mlflow.db'}"
        data = Path(tmp) / "data"
        source = make_dataset(data, n=max(64, a.steps * COMMON["batch_size"]))
        runs = interleave(a.repeats, lambda side: run_child(side, str(data), a.steps, a.max_length))
    _write("train.json", {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python bench/bench_train.py "
                   f"--steps {a.steps} --repeats {a.repeats} --max-length {a.max_length}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu", "note": MACHINE_NOTE},
        "data": source, "settings": {**COMMON, "steps": a.steps, "max_length": a.max_length},
        "cpu": summarize(runs, a.repeats),
        "gpu": {"measured": False,
                "why": "no GPU was lent to this session (device tool: task not drawn for a device machine)",
                "to_check_on_a_gpu": ["Unsloth vs TRL tokens/s on the same card and data (target >= 1.8x)",
                                      "peak GPU memory (torch.cuda.max_memory_allocated) per backend",
                                      "MFU = 6 * params * tokens/s / peak FLOPs", "QLoRA (load_in_4bit) path runs"]},
    })


def main_dpo(a: argparse.Namespace) -> None:
    lengths = ["--method", "dpo", "--max-prompt-length", str(a.max_prompt_length),
               "--max-completion-length", str(a.max_completion_length)]
    with tempfile.TemporaryDirectory(prefix="bench-train-dpo-") as tmp:
        os.environ["FLYWHEEL_HOME"] = str(Path(tmp) / ".flywheel")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / '.flywheel' / 'mlflow.db'}"
        data = Path(tmp) / "data"
        info = make_pairs(data, a.steps * COMMON["batch_size"], a.max_prompt_length, a.max_completion_length)
        floor = run_child("load", str(data), a.steps, 0, lengths)
        print(f"load only: peak RSS {floor['peak_rss_mb']:.0f} MB (model weights {floor['model_mb']:.0f} MB)")
        runs = interleave(a.repeats, lambda side: run_child(side, str(data), a.steps, 0, lengths,
                                                            tokens=info["policy_tokens"]))
    cpu = summarize(runs, a.repeats)
    cpu["rss_over_one_model_load_mb"] = {s: round(v - floor["peak_rss_mb"], 1) for s, v in cpu["peak_rss_mb"].items()}
    _write("train-dpo.json", {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python bench/bench_train.py --method dpo "
                   f"--steps {a.steps} --repeats {a.repeats} --max-prompt-length {a.max_prompt_length} "
                   f"--max-completion-length {a.max_completion_length}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu", "note": MACHINE_NOTE},
        "data": info, "settings": {**COMMON, **DPO, "steps": a.steps, "max_prompt_length": a.max_prompt_length,
                                   "max_completion_length": a.max_completion_length, "ref_model": None},
        "tokens": "policy tokens per run: prompt+chosen and prompt+rejected, no padding (the reference pass "
                  "under disable_adapter() reads the same tokens again on both sides)",
        "load_only": floor,
        "memory_note": MEMORY_NOTE,
        "cpu": cpu,
    })


if __name__ == "__main__":
    main()
