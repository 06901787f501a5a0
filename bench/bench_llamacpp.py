"""Does a published adapter behave in llama.cpp like it did in PEFT? Side by side, one run.

    python bench/bench_llamacpp.py [--adapter DIR] [--prompts 3] [--tokens 20]   (writes bench/results/llamacpp.json)

Needs llama-cpp-python (`make llama-cpp`, a 13-16 min build on 2 cores) and llama.cpp's converters
(`make llama-cpp-converters`, or FLYWHEEL_LLAMA_CPP). Without them it says so and exits 0 without results.

What it measures, for the same ChatML prompts:
1. the base converted to GGUF (f16) from the dequantized weights the adapter was trained on, and the adapter
   converted with convert_lora_to_gguf.py, exactly as `flywheel publish` writes them;
2. greedy generation in PEFT and in llama.cpp (adapter on), token agreement;
3. teacher-forced on PEFT's tokens: KL(PEFT || llama.cpp) per position and top-1 agreement, with the adapter
   (lora_scale 1) and without (lora_scale 0 vs the plain base), so "the adapter changes the output" and
   "llama.cpp applies it like PEFT" are both numbers;
4. speed: generated tokens/s in each engine (1 thread for llama.cpp: faster than 2 on a busy 2-core box).
Default adapter: a random LoRA (seeded) on q/k/v/o with visible effect; pass --adapter for a trained one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROMPTS = ["What is a good breakfast for an athlete?", "Explain what a LoRA adapter is in one sentence.",
           "List three vegetables high in iron."]


def random_adapter(base_path: Path, out: Path, seed: int = 0, scale: float = 0.04) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, scale)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base_path)).save_pretrained(str(out))
    return out


def kl(p_logits, q_logits) -> float:
    import numpy as np

    def logsoftmax(x):
        x = x - x.max()
        return x - np.log(np.exp(x).sum())

    lp, lq = logsoftmax(np.asarray(p_logits, dtype=np.float64)), logsoftmax(np.asarray(q_logits, dtype=np.float64))
    return float((np.exp(lp) * (lp - lq)).sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", help="a PEFT adapter dir trained on the SmolLM2 base (default: random LoRA)")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "llamacpp.json"))
    args = ap.parse_args()

    from flywheel.pipelines.publish import check_gguf, convert_adapter, convert_base, converters_dir

    llama_dir = converters_dir()
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    if llama_dir is None or llama_cpp is None:
        print("skipped: " + ("llama.cpp converters not installed (make llama-cpp-converters) " if llama_dir is None
                             else "") + ("llama-cpp-python not installed (make llama-cpp)" if llama_cpp is None
                                         else ""))
        return 0

    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.training.models import resolve_base_model

    torch.set_num_threads(1)
    info = resolve_base_model("smollm2-135m-instruct")
    tmp = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    adapter = Path(args.adapter) if args.adapter else random_adapter(info.path, tmp / "adapter")

    t = time.perf_counter()
    base_gguf = convert_base(info.path, tmp / "base.gguf", llama_dir)
    t_base = time.perf_counter() - t
    t = time.perf_counter()
    adapter_gguf = convert_adapter(adapter, info.path, tmp / "adapter.gguf", llama_dir)
    t_adapter = time.perf_counter() - t
    check_gguf(adapter_gguf, "adapter")

    tok = AutoTokenizer.from_pretrained(str(info.path))
    base_model = AutoModelForCausalLM.from_pretrained(str(info.path), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base_model, str(adapter)).eval()

    def load(scale):
        return llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(adapter_gguf), lora_scale=scale,
                               n_ctx=512, n_threads=1, logits_all=True, verbose=False, seed=0)

    llm_on, llm_off = load(1.0), load(0.0)
    rows = []
    peft_time = cpp_time = 0.0
    peft_tokens = cpp_tokens = 0
    for text in PROMPTS[: args.prompts]:
        prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt)["input_ids"]
        # PEFT greedy
        t = time.perf_counter()
        with torch.no_grad():
            gen = peft.generate(torch.tensor([ids]), max_new_tokens=args.tokens, do_sample=False,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
        peft_time += time.perf_counter() - t
        peft_tokens += len(gen)
        # llama.cpp greedy (adapter on)
        llm_on.reset()
        t = time.perf_counter()
        cpp_gen = []
        for token in llm_on.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
            if token == llm_on.token_eos() or len(cpp_gen) >= args.tokens:
                break
            cpp_gen.append(token)
        cpp_time += time.perf_counter() - t
        cpp_tokens += len(cpp_gen)
        n_same = next((i for i, (a, b) in enumerate(zip(gen, cpp_gen)) if a != b), min(len(gen), len(cpp_gen)))
        # teacher-forced on PEFT's path
        seq = ids + gen
        with torch.no_grad():
            p_on = peft(torch.tensor([seq])).logits[0].numpy()
            with peft.disable_adapter():
                p_off = peft(torch.tensor([seq])).logits[0].numpy()
        pos = range(len(ids) - 1, len(seq) - 1)
        out = {}
        for name, llm, ref in (("adapter", llm_on, p_on), ("base", llm_off, p_off)):
            llm.reset()
            llm.eval(seq)
            scores = np.asarray(llm.scores[: len(seq)])
            kls = [kl(ref[i], scores[i]) for i in pos]
            top1 = [int(ref[i].argmax() == scores[i].argmax()) for i in pos]
            out[name] = {"mean_kl": float(np.mean(kls)), "max_kl": float(np.max(kls)), "top1_agreement":
                         float(np.mean(top1))}
        effect = float(np.mean([kl(p_on[i], p_off[i]) for i in pos]))
        rows.append({"prompt": text, "peft": tok.decode(gen), "llama_cpp": llm_on.detokenize(cpp_gen).decode(
            "utf-8", "replace"), "greedy_tokens_identical": n_same, "greedy_tokens": len(gen),
            "teacher_forced": out, "adapter_effect_kl_peft_on_vs_off": effect})
        print(f"{text[:40]!r}: {n_same}/{len(gen)} greedy tokens identical; KL adapter "
              f"{out['adapter']['mean_kl']:.2e}, base {out['base']['mean_kl']:.2e}; adapter effect {effect:.2e}")

    agree = sum(r["greedy_tokens_identical"] for r in rows) / max(1, sum(r["greedy_tokens"] for r in rows))
    res = {
        "what": "SmolLM2-135M base (f16 GGUF from the dequantized weights) + LoRA GGUF in llama.cpp vs PEFT, greedy",
        "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
        "adapter": str(args.adapter or "random LoRA r=8 q/k/v/o, B ~ N(0, 0.04), seed 0"),
        "prompts": len(rows), "max_new_tokens": args.tokens,
        "greedy_token_agreement": agree,
        "mean_kl_adapter": float(np.mean([r["teacher_forced"]["adapter"]["mean_kl"] for r in rows])),
        "mean_kl_base": float(np.mean([r["teacher_forced"]["base"]["mean_kl"] for r in rows])),
        "top1_agreement_adapter": float(np.mean([r["teacher_forced"]["adapter"]["top1_agreement"] for r in rows])),
        "adapter_effect_kl": float(np.mean([r["adapter_effect_kl_peft_on_vs_off"] for r in rows])),
        "tokens_per_s": {"peft": peft_tokens / peft_time, "llama_cpp": cpp_tokens / cpp_time},
        "speed_ratio_llama_cpp_over_peft": (cpp_tokens / cpp_time) / (peft_tokens / peft_time),
        "convert_s": {"base_f16": t_base, "adapter_f16": t_adapter},
        "sizes_bytes": {"base_gguf": base_gguf.stat().st_size, "adapter_gguf": adapter_gguf.stat().st_size},
        "rows": rows,
    }
    print(f"greedy token agreement {agree:.3f}; mean KL with adapter {res['mean_kl_adapter']:.2e} "
          f"(adapter effect {res['adapter_effect_kl']:.2e}); llama.cpp/PEFT speed "
          f"{res['speed_ratio_llama_cpp_over_peft']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
