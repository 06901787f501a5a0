"""Driver of bench/gpu/check.sh: Unsloth vs TRL+PEFT LoRA and QLoRA 4-bit vs bf16 LoRA on SmolLM2-135M, through
the training core (training.backends / training.sft, no MLflow), on the same data and settings.

Each variant runs in its own process: Unsloth patches transformers/trl when imported, so the TRL numbers must
come from a process that never imported it. Per variant: tokens/s (trained steps after `--warmup`), peak GPU
memory, MFU (6 * N_params * tokens/s over the GPU's dense bf16 peak) and the loss at each step.

    python bench/gpu/check.py --config-dir DIR --out bench/results/gpu-check.json [--model DIR] [--cpu-smoke]

Without `--model` the base is built from SmolLM2-135M's config with a seeded random init: same shapes, FLOPs,
memory and speed as the real weights (which are too big to carry to an offline GPU machine); losses then compare
backends with each other, not with the published model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

GPU_VARIANTS = {  # name: (backend, load_in_4bit)
    "trl_bf16": ("trl", False), "unsloth_bf16": ("unsloth", False),
    "trl_qlora": ("trl", True), "unsloth_qlora": ("unsloth", True),
}
# Dense bf16 peak FLOP/s by device name (vendor datasheets, no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


def conversations(n: int, words: int) -> list[dict]:
    """Deterministic chats of ~`words` words per answer: long enough that a step is compute, not overhead."""
    import random

    rng = random.Random(0)
    vocab = ("protein fibre vitamin meal breakfast lunch dinner water energy sleep walk salad bean rice fish "
             "apple yogurt balance portion snack morning evening habit").split()
    rows = []
    for i in range(n):
        q = " ".join(rng.choices(vocab, k=12))
        a = " ".join(rng.choices(vocab, k=words))
        rows.append({"messages": [{"role": "system", "content": "Answer as a nutrition assistant."},
                                  {"role": "user", "content": f"Question {i}: {q}?"},
                                  {"role": "assistant", "content": a.capitalize() + "."}]})
    return rows


def build_random_base(config_dir: Path, out: Path) -> Path:
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "model.safetensors").exists():
        return out
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in config_dir.iterdir():
        if f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def run_one(name: str, args) -> dict:
    """One variant, in this process: the training core exactly as `flywheel train` calls it."""
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from flywheel.training.audit import tokenize_conversations, training_template
    from flywheel.training.backends import Backend, prepare_backend, select_backend
    from flywheel.training.sft import SFTParams, build_trainer, train

    if args.cpu_smoke:
        backend, four_bit = Backend("trl", "cpu", "cpu smoke"), False
    else:
        requested, four_bit = GPU_VARIANTS[name]
        backend = select_backend(requested)
    prepare_backend(backend)
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = conversations(args.examples, args.words)
    tmpl, _ = training_template(tok, [r["messages"] for r in rows], True)
    data = tokenize_conversations(rows, tok, chat_template=tmpl, max_length=args.max_length, overlong="truncate",
                                  assistant_only_loss=True)
    out = Path(args.work) / name
    params = SFTParams(model_path=str(args.model), output_dir=str(out), max_steps=args.steps,
                       batch_size=args.batch_size, max_length=args.max_length, learning_rate=2e-4,
                       save_every=10_000, eval_every=0, load_in_4bit=four_bit, seed=0, lora_r=16, lora_alpha=32)

    class Clock(TrainerCallback):
        """Tokens and seconds after the warm-up steps (compilation, autotuning and allocator growth)."""

        def __init__(self):
            self.t0 = self.tok0 = None
            self.t1 = self.tok1 = None

        def on_step_end(self, a, state, control, **kw):
            if backend.device == "cuda":
                torch.cuda.synchronize()
            if state.global_step == args.warmup:
                self.t0, self.tok0 = time.perf_counter(), int(state.num_input_tokens_seen)
            self.t1, self.tok1 = time.perf_counter(), int(state.num_input_tokens_seen)

    clock = Clock()
    if backend.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(params, backend, tok, data.rows, None, [clock])
    stats = train(trainer)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    tps = None
    if clock.t0 is not None and clock.t1 > clock.t0:
        tps = (clock.tok1 - clock.tok0) / (clock.t1 - clock.t0)
    result = {"variant": name, "backend": backend.name, "device": backend.device, "load_in_4bit": four_bit,
              "steps": stats["global_step"], "losses": stats["losses"], "final_loss": stats["final_loss"],
              "tokens_per_s": tps, "n_params": n_params}
    if backend.device == "cuda":
        dev = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16.items() if k in dev), None)
        result.update(device_name=dev, peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
                      mfu=(6 * n_params * tps / peak) if (peak and tps) else None)
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-dir", type=Path, default=None, help="SmolLM2-135M config + tokenizer")
    ap.add_argument("--model", type=Path, default=None, help="a real HF model dir instead of the random init")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu-check.json")
    ap.add_argument("--work", type=Path, default=Path("/tmp/flywheel-gpu-check"))
    ap.add_argument("--cpu-smoke", action="store_true", help="TRL on CPU, 2 steps: the code path without a GPU")
    ap.add_argument("--tests", default="skipped", help="exit code of the gpu-marked tests (from check.sh)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--words", type=int, default=300)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode: run one variant, print JSON
    args = ap.parse_args()
    if args.cpu_smoke:
        args.steps, args.warmup, args.batch_size, args.max_length, args.examples, args.words = 2, 1, 2, 128, 8, 40
    if args.model is None:
        if args.config_dir is None:
            from flywheel.training.models import resolve_base_model

            args.config_dir = resolve_base_model("smollm2-135m-instruct").path
        args.model = build_random_base(Path(args.config_dir), args.work / "smollm2-135m-random")
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)))
        return 0

    variants = ["cpu_smoke"] if args.cpu_smoke else list(GPU_VARIANTS)
    results, t0 = {}, time.perf_counter()
    for name in variants:
        cmd = [sys.executable, __file__, "--one", name, "--model", str(args.model), "--work", str(args.work),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--examples", str(args.examples), "--words", str(args.words)]
        cmd += ["--cpu-smoke"] if args.cpu_smoke else []
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        results[name] = json.loads(line[7:]) if line else {"error": (p.stderr or p.stdout)[-3000:]}
    summary = {"tests_rc": args.tests, "seconds": time.perf_counter() - t0, "variants": results,
               "settings": {k: getattr(args, k) for k in ("steps", "warmup", "batch_size", "max_length", "words")},
               "model": "random init from config" if args.config_dir else str(args.model)}

    def ratio(a, b, key):
        va, vb = results.get(a, {}).get(key), results.get(b, {}).get(key)
        return va / vb if va and vb else None

    if not args.cpu_smoke:
        summary["targets"] = {
            "unsloth_vs_trl_tokens_per_s": ratio("unsloth_bf16", "trl_bf16", "tokens_per_s"),   # target >= 1.8
            "qlora_vs_bf16_peak_memory": ratio("trl_qlora", "trl_bf16", "peak_memory_gib"),       # target <= 0.5
            "unsloth_qlora_vs_bf16_peak_memory": ratio("unsloth_qlora", "unsloth_bf16", "peak_memory_gib"),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    print(json.dumps(summary.get("targets", {}), indent=2), f"\n-> {args.out}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
