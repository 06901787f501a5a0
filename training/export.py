"""Merge a LoRA adapter into its base, convert the merged model to GGUF, and check the GGUF that came out; the
rest of a published folder (SYSTEM prompt, README with lineage) and the checks that read it back.

Plain functions over paths and dicts (no MLflow, no CLI framework); `flywheel.pipelines.publish` orchestrates them.

    python -m flywheel.training.export merge BASE_DIR ADAPTER_DIR DEST [--tokenizer DIR] [--chat-template-file F]

Why a merged model: one GGUF with the LoRA folded into the weights is what every llama.cpp-based runtime loads,
including Ollamas that no longer take an `ADAPTER` line. The merge runs on the full-precision base the adapter
was trained against (the caller checks the hash), in place (`merge_and_unload`), and is saved in small shards
so saving never holds a second copy of the model. Conversion runs llama.cpp's own `convert_hf_to_gguf.py` in a
subprocess; the peak RSS of each subprocess is measured with `os.wait4`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flywheel.foundation.errors import InputError

if TYPE_CHECKING:  # the merge child (`python -m flywheel.training.export merge`) needs no pydantic
    from flywheel.training.export_config import PublishConfig

# What llama.cpp's convert_hf_to_gguf.py writes itself (`--outtype`). Everything else needs llama-quantize.
CONVERTER_TYPES = ("f16", "bf16", "q8_0")
LLAMA_QUANTIZE_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s",
                        "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")
# GGML type names GGUFReader reports for the matrices of each converter type. The converter keeps 1-D tensors
# (norms, biases) in F32 whatever --outtype says, and falls back to F16 for a q8_0 matrix whose rows do not
# split into 32-element blocks.
MATRIX_TYPES = {"f16": {"F16"}, "bf16": {"BF16"}, "q8_0": {"Q8_0", "F16"}}
GGUF_MAGIC = b"GGUF"


class ExportError(ValueError):
    """A merge, conversion or GGUF check that failed; one line, naming the file."""


# ---------------------------------------------------------------------------------------------- subprocesses

@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_bytes: int
    timed_out: bool = False


def _vm_hwm(pid: int) -> int:
    """The process's own peak RSS so far (`VmHWM`, bytes), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_measured(cmd: list[str], *, env: dict | None = None, timeout: float = 900) -> Measured:
    """Run `cmd`, return its output, wall time and peak RSS.

    The peak is the child's own high-water mark (`VmHWM`, sampled every 50 ms), not `ru_maxrss` from `wait4`:
    Linux carries `ru_maxrss` across fork+exec, so a child started by a large process would report the parent's
    size. The child is killed on timeout and if this process is interrupted: no converter outlives its caller.
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], _vm_hwm(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
            done.set()
            sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen so it does not wait
        out.seek(0)
        err.seek(0)
        return Measured(proc.returncode, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"),
                        time.perf_counter() - t0, peak[0] or usage.ru_maxrss * 1024, timed_out=timer.finished.is_set()
                        and proc.returncode < 0)


def _tail(m: Measured) -> str:
    return " | ".join((m.stderr or m.stdout).strip().splitlines()[-3:])[:400]


def converter_env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converters must use their own gguf-py: PyPI's gguf lags behind them
    return env


# ---------------------------------------------------------------------------------------------- merge

def safetensors_index(model_dir: Path) -> dict[str, dict]:
    """{tensor name: {shape, dtype}} from the safetensors headers (no weights are read)."""
    from safetensors import safe_open

    out: dict[str, dict] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                s = st.get_slice(k)
                out[k] = {"shape": list(s.get_shape()), "dtype": s.get_dtype()}
    return out


def merge_lora(base_dir: Path, adapter_dir: Path, dest: Path, *, tokenizer_dir: Path | None = None,
               chat_template: str | None = None, max_shard_size: str = "100MB") -> dict:
    """Fold the LoRA into the full-precision base and save a plain HF directory at `dest` (must not exist).

    The tokenizer is saved beside the weights, with `chat_template` when given, so the GGUF carries the same
    template the Modelfile was derived from. Returns {tensors: safetensors_index, peak_rss_bytes, seconds}.
    """
    import resource

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, low_cpu_mem_usage=True)
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as e:  # wrong shapes or module names: the adapter is not for this base
        raise ExportError(f"{adapter_dir}: adapter does not load on {base_dir}: {str(e).splitlines()[0][:300]}") \
            from None
    model = model.merge_and_unload()
    dest.mkdir(parents=True)
    # Small shards: safetensors serialises a shard through one bytes buffer, so a whole-model shard would
    # briefly be a second copy of the model in memory.
    model.save_pretrained(str(dest), max_shard_size=max_shard_size, safe_serialization=True)
    del model
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir or base_dir))
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(str(dest))
    return {"tensors": safetensors_index(dest), "seconds": time.perf_counter() - t0,
            "peak_rss_bytes": _vm_hwm(os.getpid()) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def merge_in_subprocess(base_dir: Path, adapter_dir: Path, dest: Path, *, tokenizer_dir: Path | None = None,
                        chat_template: str | None = None, timeout: float = 900) -> dict:
    """`merge_lora` in a child process: its memory is returned to the OS before the converter starts."""
    cmd = [sys.executable, "-m", "flywheel.training.export", "merge", str(base_dir), str(adapter_dir), str(dest)]
    if tokenizer_dir:
        cmd += ["--tokenizer", str(tokenizer_dir)]
    with tempfile.TemporaryDirectory(prefix="flywheel-merge-") as td:
        if chat_template:
            (Path(td) / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
            cmd += ["--chat-template-file", str(Path(td) / "chat_template.jinja")]
        result_file = Path(td) / "result.json"
        cmd += ["--result", str(result_file)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        m = run_measured(cmd, env=env, timeout=timeout)
        if m.timed_out:
            raise ExportError(f"merging {adapter_dir} into {base_dir}: timed out after {timeout:.0f}s")
        if m.returncode != 0:
            raise ExportError(f"merging {adapter_dir} into {base_dir} failed (exit {m.returncode}): {_tail(m)}")
        res = json.loads(result_file.read_text())
    res["peak_rss_bytes"] = max(res["peak_rss_bytes"], m.peak_rss_bytes)
    res["seconds"] = m.seconds
    return res


# ---------------------------------------------------------------------------------------------- convert

def check_outtype(outtype: str) -> str:
    if outtype in CONVERTER_TYPES:
        return outtype
    if outtype.lower() in LLAMA_QUANTIZE_TYPES:
        raise ExportError(f"quantize: {outtype!r} is not written by convert_hf_to_gguf.py (it writes "
                          f"{', '.join(CONVERTER_TYPES)}); publish f16 and run llama.cpp's `llama-quantize "
                          f"model.gguf model-{outtype.upper()}.gguf {outtype.upper()}`")
    raise ExportError(f"quantize: {outtype!r} is not a GGUF type; use one of {', '.join(CONVERTER_TYPES)}")


def convert_hf(model_dir: Path, dest: Path, llama_cpp: Path, outtype: str = "f16", timeout: float = 900) -> dict:
    """Run llama.cpp's convert_hf_to_gguf.py on a HF directory. Returns {seconds, peak_rss_bytes}."""
    check_outtype(outtype)
    script = Path(llama_cpp) / "convert_hf_to_gguf.py"
    if not script.exists():
        raise ExportError(f"{script}: llama.cpp's converter is missing (run `make llama-cpp-converters`)")
    m = run_measured([sys.executable, str(script), str(model_dir), "--outtype", outtype, "--outfile", str(dest)],
                     env=converter_env(), timeout=timeout)
    if m.timed_out:
        raise ExportError(f"{script.name}: timed out after {timeout:.0f}s")
    if m.returncode != 0:
        raise ExportError(f"{script.name} failed (exit {m.returncode}): {_tail(m)}")
    return {"seconds": m.seconds, "peak_rss_bytes": m.peak_rss_bytes}


# ---------------------------------------------------------------------------------------------- GGUF checks

def _vendored_gguf(llama_cpp: Path | None):
    """llama.cpp's own gguf-py, imported under another name so it cannot shadow PyPI's `gguf`."""
    import importlib.util

    pkg = Path(llama_cpp or "") / "gguf-py" / "gguf"
    if not (pkg / "__init__.py").exists():
        return None
    name = "flywheel_vendored_gguf"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def read_gguf(path: Path, llama_cpp: Path | None = None) -> dict:
    """Header facts of a GGUF: type, architecture, chat template, vocabulary, and each tensor's GGML type."""
    path = Path(path)
    if not path.exists() or path.stat().st_size < 32:
        raise ExportError(f"{path}: missing or empty GGUF")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ExportError(f"{path}: not a GGUF file (bad magic)")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as first:  # PyPI's gguf can lag behind the converter that wrote the file
        mod = _vendored_gguf(llama_cpp)
        if mod is None:
            raise ExportError(f"{path}: unreadable GGUF ({first})") from None
        try:
            reader = mod.GGUFReader(str(path))
        except Exception as e:
            raise ExportError(f"{path}: unreadable GGUF ({e})") from None

    def field(name):
        fld = reader.fields.get(name)
        if fld is None or not fld.data:
            return None
        if len(fld.data) == 1:
            part = fld.parts[fld.data[0]]
            return bytes(part).decode("utf-8") if part.dtype.kind == "u" and part.dtype.itemsize == 1 \
                else part.tolist()[0]
        return [bytes(fld.parts[i]).decode("utf-8", "replace") for i in fld.data]

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = [bytes(tokens.parts[i]).decode("utf-8", "replace") for i in tokens.data] if tokens else []
    return {
        "type": field("general.type"), "architecture": field("general.architecture"),
        "chat_template": field("tokenizer.chat_template"), "tokens": vocab,
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "tensors": {t.name: {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape]}
                    for t in reader.tensors},
        "size": path.stat().st_size,
    }


def expected_gguf_tensors(hf_tensors: dict[str, dict]) -> int:
    """How many tensors convert_hf_to_gguf.py writes for these HF tensors: one each (a tied lm_head is not saved)."""
    return len([n for n in hf_tensors if not n.endswith("rotary_emb.inv_freq")])


def check_merged_gguf(path: Path, *, hf_tensors: dict[str, dict], outtype: str, chat_template: str | None,
                      stops: list[str], llama_cpp: Path | None = None) -> dict:
    """The GGUF `flywheel publish` ships: a model (not an adapter), the same tensors as the merge, in the
    requested type, carrying the chat template and every stop token the Modelfile names. Returns a summary."""
    info = read_gguf(path, llama_cpp)
    if info["type"] not in (None, "model"):
        raise ExportError(f"{path}: general.type is {info['type']!r}, expected 'model'")
    tensors = info["tensors"]
    want = expected_gguf_tensors(hf_tensors)
    if len(tensors) != want:
        raise ExportError(f"{path}: {len(tensors)} tensors, but the merged model has {want}")
    matrix = MATRIX_TYPES[check_outtype(outtype)]
    types: dict[str, int] = {}
    for name, t in tensors.items():
        types[t["type"]] = types.get(t["type"], 0) + 1
        is_matrix = sum(1 for d in t["shape"] if d > 1) >= 2
        if (t["type"] not in matrix) if is_matrix else (t["type"] not in matrix | {"F32"}):
            raise ExportError(f"{path}: tensor {name} is {t['type']}, expected {'/'.join(sorted(matrix))} "
                              f"for quantize={outtype}")
    if outtype.upper() not in types:
        raise ExportError(f"{path}: no tensor of type {outtype}")
    if chat_template is not None and info["chat_template"] != chat_template:
        raise ExportError(f"{path}: tokenizer.chat_template differs from the template the Modelfile was derived "
                          "from")
    vocab = set(info["tokens"])
    missing = [s for s in stops if s not in vocab]
    if missing:
        raise ExportError(f"{path}: stop token(s) {missing} named in the Modelfile are not in the GGUF vocabulary")
    return {"tensors": len(tensors), "types": types, "size": info["size"], "architecture": info["architecture"],
            "chat_template": info["chat_template"] is not None, "stops_in_vocab": list(stops)}


# ---------------------------------------------------------------------------------------- converters, by path
# llama.cpp's own scripts, found where `make llama-cpp-converters` installs them, run in child processes.

def converters_dir(configured: str | None = None) -> Path | None:
    """Where convert_lora_to_gguf.py lives (with its gguf-py and conversion/ beside it), or None.

    A configured folder is the only one looked at (so a config can also switch conversion off); otherwise
    $FLYWHEEL_LLAMA_CPP, then where `make llama-cpp-converters` puts them.
    """
    candidates = [configured] if configured else [os.environ.get("FLYWHEEL_LLAMA_CPP"),
                                                  str(Path(sys.prefix) / "share" / "flywheel" / "llama.cpp")]
    for c in candidates:
        if c and (Path(c) / "convert_lora_to_gguf.py").exists() and (Path(c) / "gguf-py").is_dir():
            return Path(c)
    return None


def _run_converter(script: Path, args: list[str], timeout: int) -> dict:
    m = run_measured([sys.executable, str(script), *args], env=converter_env(), timeout=timeout)
    if m.timed_out:
        raise InputError(f"{script.name}: timed out after {timeout}s")
    if m.returncode != 0:
        tail = (m.stderr or m.stdout).strip().splitlines()[-3:]
        raise InputError(f"{script.name} failed (exit {m.returncode}): {' | '.join(tail)[:400]}")
    return {"seconds": m.seconds, "peak_rss_bytes": m.peak_rss_bytes}


def convert_adapter(adapter_dir: Path, base_dir: Path, dest: Path, llama_cpp: Path, outtype: str = "f16",
                    timeout: int = 900) -> Path:
    # Always --base: adapter_config.json holds whatever base path training used, often relative or gone.
    _run_converter(llama_cpp / "convert_lora_to_gguf.py",
                   [str(adapter_dir), "--base", str(base_dir), "--outtype", outtype, "--outfile", str(dest)], timeout)
    check_gguf(dest, expect_type="adapter")
    return dest


def convert_base(base_dir: Path, dest: Path, llama_cpp: Path, outtype: str = "f16", timeout: int = 900) -> Path:
    _run_converter(llama_cpp / "convert_hf_to_gguf.py", [str(base_dir), "--outtype", outtype, "--outfile",
                                                         str(dest)], timeout)
    check_gguf(dest, expect_type="model")
    return dest


def check_gguf(path: Path, expect_type: str | None = None) -> dict:
    """Open a GGUF and read `general.type`: llama.cpp segfaults on a bad `lora_path` instead of raising."""
    try:
        info = read_gguf(path, converters_dir())
    except ExportError as e:
        raise InputError(str(e)) from None
    kind = info["type"]
    ok = kind == "adapter" if expect_type == "adapter" else kind in ("model", None)
    if expect_type and not ok:
        raise InputError(f"{path}: general.type is {kind!r}, expected {expect_type!r}")
    return {"type": kind, "size": info["size"], "tensors": len(info["tensors"])}


# ---------------------------------------------------------------------------------------- the published folder
# What `flywheel publish` writes beside the GGUF: the SYSTEM prompt (static part only), the README with the
# lineage, and the checks that parse both back before they are written.

# Template fields in any of the syntaxes the project writes: `{{ context }}` (prompt variants), `{context}`
# (mine's system_template), and Jinja blocks.
FIELD_RE = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{[A-Za-z_][A-Za-z0-9_.]*\}", re.S)


def split_system(template_system: str) -> tuple[str, str]:
    """(static part, per-request part) of a variant's system text, split at blank-line paragraphs.

    A paragraph that names a field (and so its label, e.g. "Context:") belongs to the request; the rest is
    the same for every request and goes into SYSTEM.
    """
    paras = re.split(r"\n\s*\n", template_system.strip())
    static = [p for p in paras if not FIELD_RE.search(p)]
    dynamic = [p for p in paras if FIELD_RE.search(p)]
    return "\n\n".join(static).strip(), "\n\n".join(dynamic).strip()


def static_system(text: str | None, source: str) -> str | None:
    """Refuse a SYSTEM that is empty or still holds template fields (Ollama would send them literally)."""
    if text is None:
        return None
    if not text.strip():
        raise InputError(f"{source}: the static system prompt is empty; nothing to put in SYSTEM "
                         "(pass --system TEXT)")
    found = FIELD_RE.findall(text)
    if found:
        raise InputError(f"{source}: the system prompt still contains template field(s) {found[:3]}; SYSTEM "
                         "cannot fill them per request (pass --system with the static text)")
    return text.strip()


def chat_api_example(name: str, static: str, dynamic: str) -> str:
    """An Ollama /api/chat request whose system message carries the static text plus the request's fields."""
    filled = FIELD_RE.sub(lambda m: "<" + re.sub(r"[{}%\s]", "", m.group(0)) + " for this request>", dynamic)
    body = {"model": name, "stream": False, "messages": [
        {"role": "system", "content": f"{static}\n\n{filled}"},
        {"role": "user", "content": "<the user's question>"}]}
    return "curl http://localhost:11434/api/chat -d " + shlex.quote(json.dumps(body, ensure_ascii=False))


ADAPTER_CAVEAT = ("mode=adapter writes an ADAPTER line: Ollama takes one GGUF adapter (or a safetensors adapter "
                  "for llama/gemma2 bases only), and Ollama v0.34.1 and later are reported to reject any Modelfile "
                  "with ADAPTER at `ollama create`; use the default mode=merged for current Ollama")


OLLAMA_NOTES = {
    "merged": ["This folder has no `ADAPTER` line: the LoRA is merged into `model.gguf`, which any Ollama that "
               "imports GGUF files accepts (including v0.34.1 and later, reported to reject `ADAPTER`), and which "
               "llama.cpp loads directly (`llama-cli -m model.gguf`)."],
    "adapter": ["`base.gguf` + `adapter.gguf`: for llama.cpp (`llama-cli -m base.gguf --lora adapter.gguf`) and "
                "Ollama releases before v0.34.1, whose `ADAPTER` takes one GGUF adapter. " + ADAPTER_CAVEAT + "."],
}


def readme(lin: dict, *, name: str, files: dict[str, str | None], warnings: list[str], system: str | None,
           create_cmd: str, mode: str = "merged", quantize: str = "f16",
           request_system: tuple[str, str] | None = None) -> str:
    def v(x):
        return f"`{x}`" if x else "unknown"

    rows = [
        ("logs", ", ".join(f"`{x}`" for x in lin.get("logs") or []) or "unknown"),
        ("mine run (`flywheel/mine`)", v(lin.get("mine_run"))),
        ("dataset version", v(lin.get("dataset_version"))),
        ("train run (`flywheel/train`)", v(lin.get("train_run"))),
        ("eval run (`flywheel/prompts`)", v(lin.get("eval_run"))),
        ("gate run (`flywheel/gate`)", f"{v(lin.get('gate_run'))} decision: {v(lin.get('gate_decision'))}"),
        ("registered model", f"{v(lin.get('registered_model'))} version {v(lin.get('version'))}"),
        ("base model", f"{v(lin.get('base_model'))} sha256 {v(lin.get('base_model_sha256'))}"),
        ("prompt variant", v(lin.get("prompt_variant"))),
        ("mode", v(mode)),
        ("quantization", v(quantize)),
    ]
    lines = [f"# {name}", "", "Published by `flywheel publish`. Run it with Ollama:", "", "```bash",
             create_cmd, shlex.join(["ollama", "run", name]), "```", ""] + OLLAMA_NOTES[mode]
    if mode == "merged":
        lines += ["", "## Quantization", "",
                  f"`model.gguf` is `{quantize}`, written by llama.cpp's `convert_hf_to_gguf.py` (which writes f16, "
                  "bf16 and q8_0: `flywheel publish ... quantize=q8_0`). Smaller k-quants (Q4_K_M, Q5_K_M, Q6_K, "
                  "...) need llama.cpp's `llama-quantize` on the f16 file, then point FROM at the result:", "",
                  "```bash", "llama-quantize model.gguf model-Q4_K_M.gguf Q4_K_M",
                  "sed -i 's#^FROM ./model.gguf#FROM ./model-Q4_K_M.gguf#' Modelfile", "```",
                  "", "(`ollama create --quantize q4_K_M` does the same inside Ollama for f16/bf16 models.)"]
    lines += ["", "## Lineage", "", "| step | value |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    lines += ["", "## Files", ""] + [f"- `{k}`: {v_ or 'not produced'}" for k, v_ in files.items()]
    if system:
        lines += ["", "## System prompt", "", "`SYSTEM` in the Modelfile (used when a request sends no system "
                  "message):", "", "```text", system, "```"]
    if request_system:
        static, dynamic = request_system
        lines += ["", "## Per-request context", "",
                  "The prompt variant also has per-request fields, which are not in `SYSTEM` (a fixed placeholder "
                  "there would be answered from on every request). Send them in your own system message; it "
                  "replaces `SYSTEM` for that request:", "", "```text", dynamic, "```", "", "```bash",
                  chat_api_example(name, static, dynamic), "```"]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


def check_readme(text: str, lin: dict, quantize: str) -> None:
    """The lineage a reader needs to trace the model: dataset, train run, gate run and the quantization."""
    for key in ("dataset_version", "train_run", "gate_run"):
        if lin.get(key) and f"`{lin[key]}`" not in text:
            raise InputError(f"README.md: lineage row {key} ({lin[key]}) missing")
    if f"| quantization | `{quantize}` |" not in text:
        raise InputError("README.md: quantization row missing")


def check_modelfile(text: str, folder: Path, mode: str) -> None:
    """Parse what will be written (Ollama's grammar); merged: no ADAPTER; local FROM/ADAPTER files exist."""
    from flywheel.training.modelfile import ModelfileError, parse

    try:
        mf = parse(text)
    except ModelfileError as e:
        raise InputError(f"Modelfile: {e}") from None
    if mode == "merged" and (mf.get("adapter") is not None or mf.get("from") != "./model.gguf"):
        raise InputError("Modelfile: mode=merged must be FROM ./model.gguf with no ADAPTER line")
    for key in ("from", "adapter"):
        ref = mf.get(key)
        if ref and ref.startswith("./") and not (folder / ref).exists():
            raise InputError(f"Modelfile: {key.upper()} {ref} does not exist in the published folder")


# ---------------------------------------------------------------------------------------- writing the folder
# The steps of `flywheel publish` between resolving the model (the shell: registry, MLflow) and logging the run.

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass
class Source:
    """What publish resolved before anything is written."""

    model: Any                             # the registry's resolved model: uri, adapter_dir, meta, tags
    name: str
    out_dir: Path
    info: Any                              # the base model, checked by hash
    tok_dir: Path
    chat: Any                              # ChatFormat: TEMPLATE and stops
    chat_template: str
    system_text: str | None
    request_system: tuple[str, str] | None
    llama_cpp: Path | None
    warnings: list[str] = field(default_factory=list)


@dataclass
class Weights:
    """What the weights step wrote into the folder, and how the Modelfile refers to it."""

    files: dict[str, str | None]
    base_ref: str
    base_is_path: bool
    adapter_ref: str | None
    export: dict[str, Any] = field(default_factory=dict)
    model_gguf: Path | None = None
    gguf_adapter: Path | None = None
    base_gguf: Path | None = None


def ollama_name(name: str) -> str:
    """`name` if Ollama takes it as a model name, else a one-line InputError (a shell-safe `ollama create`
    line is only half the fix: `-rf` or `a b` would still fail, or mean something else, in Ollama)."""
    from flywheel.training.modelfile import ModelfileError, check_model_name

    try:
        return check_model_name(name)
    except ModelfileError as e:
        raise InputError(f"{e}; choose one with `name=<ollama name>`") from None


def verified_base(model: Any, cfg: PublishConfig) -> Any:
    """The base, by hash: an adapter on the wrong base loads fine and produces gibberish."""
    from flywheel.training.models import resolve_base_model

    meta = model.meta
    base_name, recorded = meta.get("base_model"), meta.get("base_model_sha256")
    if not base_name or not recorded:
        raise InputError(f"{model.adapter_dir}/flywheel_adapter.json: base_model / base_model_sha256 missing; "
                         "cannot prove which base this adapter belongs to")
    info = resolve_base_model(base_name, cfg.model_cache)
    if info.sha256 != recorded:
        raise InputError(f"adapter {model.label} was trained on {base_name} sha256 {recorded[:12]}…, but "
                         f"{info.path} has sha256 {info.sha256[:12]}…: refusing to publish on another base")
    return info


def chat_format_from_tokenizer(tok_dir: Path, meta: dict):
    """ChatFormat from the tokenizer the adapter was trained with (its chat template and special tokens)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from flywheel.training.modelfile import derive_chat_format

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if meta.get("chat_template"):
        tok.chat_template = meta["chat_template"]  # the inference template training recorded
    if not tok.chat_template:
        raise InputError(f"{tok_dir}: tokenizer has no chat template; cannot write a TEMPLATE")

    def render(messages, gen):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    specials = list(tok.all_special_tokens) + list(tok.get_added_vocab().keys())
    eos = list(meta.get("eos_tokens") or []) + ([tok.eos_token] if tok.eos_token else [])
    return derive_chat_format(render, specials, eos), tok.chat_template


def check_converters(cfg: PublishConfig, warnings: list[str]) -> Path | None:
    """Merged mode cannot do without llama.cpp's converters, so fail before anything is written."""
    llama_cpp = converters_dir(cfg.llama_cpp_dir)
    if cfg.mode == "merged":
        if cfg.base != "gguf":
            raise InputError("base=ollama applies to mode=adapter only: a merged model carries its own weights")
        if llama_cpp is None or not (llama_cpp / "convert_hf_to_gguf.py").exists():
            raise InputError("mode=merged needs llama.cpp's convert_hf_to_gguf.py: run `make llama-cpp-converters` "
                             "or set FLYWHEEL_LLAMA_CPP (or publish mode=adapter)")
    else:
        warnings.append(ADAPTER_CAVEAT)
    return llama_cpp


def write_weights(tmp: Path, src: Source, cfg: PublishConfig) -> Weights:
    """The merged model.gguf, or the adapter pair (mode=adapter)."""
    info = src.info
    if cfg.mode == "merged":
        export = export_merged(src.model.adapter_dir, info.path, src.tok_dir, src.chat_template,
                               list(src.chat.stop), tmp / "model.gguf", src.llama_cpp, cfg.quantize,
                               cfg.convert_timeout_s)
        files: dict[str, str | None] = {
            "Modelfile": "Ollama Modelfile (no ADAPTER line)",
            "model.gguf": f"{info.name} + LoRA merged (PEFT merge_and_unload), GGUF {cfg.quantize} "
                          f"({export['check']['tensors']} tensors)"}
        return Weights(files, "./model.gguf", True, None, export=export, model_gguf=tmp / "model.gguf")
    files, base_ref, base_is_path, adapter_ref, gguf_adapter, base_gguf = write_adapter_pair(
        tmp, src.model.adapter_dir, info, src.llama_cpp, cfg, src.warnings)
    return Weights(files, base_ref, base_is_path, adapter_ref, gguf_adapter=gguf_adapter, base_gguf=base_gguf)


def export_merged(adapter_dir: Path, base_dir: Path, tok_dir: Path, chat_template: str, stops: list[str],
                  dest: Path, llama_cpp: Path, quantize: str, timeout: int) -> dict:
    """Merge (child process), convert (child process), check; the merged HF copy lives only beside `dest`."""
    work = dest.parent / ".merged-hf"
    try:
        merged = merge_in_subprocess(base_dir, adapter_dir, work, tokenizer_dir=tok_dir, chat_template=chat_template,
                                     timeout=timeout)
        conv = convert_hf(work, dest, llama_cpp, quantize, timeout)
        check = check_merged_gguf(dest, hf_tensors=merged["tensors"], outtype=quantize, chat_template=chat_template,
                                  stops=stops, llama_cpp=llama_cpp)
    except ExportError as e:
        raise InputError(str(e)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"check": check, "merge_s": merged["seconds"], "convert_s": conv["seconds"],
            "peak_rss_merge": merged["peak_rss_bytes"], "peak_rss_convert": conv["peak_rss_bytes"]}


def write_adapter_pair(tmp: Path, adapter_dir: Path, info: Any, llama_cpp: Path | None, cfg: PublishConfig,
                       warnings: list[str]) -> tuple[dict, str, bool, str, Path | None, Path | None]:
    """mode=adapter: adapter/ (safetensors), adapter.gguf and base.gguf when the converters are installed.

    Returns (files, FROM, FROM is a path, ADAPTER, adapter.gguf or None, base.gguf or None).
    """
    files: dict[str, str | None] = {"Modelfile": "Ollama Modelfile", "adapter/": "PEFT safetensors adapter"}
    (tmp / "adapter").mkdir()
    for f in ADAPTER_FILES:
        src = adapter_dir / f
        if not src.exists():
            raise InputError(f"{adapter_dir}: {f} missing")
        shutil.copyfile(src, tmp / "adapter" / f)
    gguf_adapter = base_gguf = None
    if cfg.gguf_adapter:
        if llama_cpp is None:
            warnings.append("GGUF adapter NOT produced: llama.cpp's converters are not installed "
                            "(run `make llama-cpp-converters` or set FLYWHEEL_LLAMA_CPP); the Modelfile "
                            "uses the safetensors adapter")
        else:
            gguf_adapter = convert_adapter(tmp / "adapter", info.path, tmp / "adapter.gguf", llama_cpp,
                                           cfg.quantize, cfg.convert_timeout_s)
    files["adapter.gguf"] = "GGUF LoRA adapter (llama.cpp convert_lora_to_gguf.py)" if gguf_adapter else None
    base_ref, base_is_path = cfg.ollama_base, False
    if cfg.base == "gguf":
        if llama_cpp is None:
            warnings.append(f"base.gguf NOT produced (no llama.cpp converters): FROM {cfg.ollama_base}, "
                            "Ollama's own weights, which may differ slightly from the evaluated base")
        else:
            cached = cached_base_gguf(info.path, info.sha256, llama_cpp, cfg.quantize, cfg.convert_timeout_s)
            link_or_copy(cached, tmp / "base.gguf")
            base_gguf = tmp / "base.gguf"
            base_ref, base_is_path = "./base.gguf", True
    files["base.gguf"] = f"{info.name} converted to GGUF ({cfg.quantize})" if base_gguf else None
    return files, base_ref, base_is_path, "./adapter.gguf" if gguf_adapter else "./adapter", gguf_adapter, base_gguf


def cached_base_gguf(base_dir: Path, sha256: str, llama_cpp: Path, outtype: str, timeout: int) -> Path:
    """Converting the base takes ~10 s and 270 MB: do it once per base hash, then hard-link into folders."""
    from flywheel.foundation.io import flywheel_home

    cache = flywheel_home() / "cache" / "gguf" / f"{sha256[:16]}-{outtype}.gguf"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".tmp-{os.getpid()}-{cache.name}")
        try:
            convert_base(base_dir, tmp, llama_cpp, outtype, timeout)
            os.replace(tmp, cache)
        finally:
            tmp.unlink(missing_ok=True)
    return cache


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_docs(tmp: Path, src: Source, w: Weights, cfg: PublishConfig, parameters: dict, lin: dict) -> str:
    """Modelfile, README.md, lineage.json and .gitignore, each checked before it is written. `lin`: the model's
    lineage (updated with mode, quantization and the GGUF check). -> the `ollama create` command."""
    from flywheel.foundation.io import write_json
    from flywheel.training.modelfile import ModelfileSpec, create_command, write

    model, info, warnings = src.model, src.info, src.warnings
    header = [f"Published by flywheel publish from {model.uri} (mode {cfg.mode}, {cfg.quantize})",
              f"base {info.name} sha256 {info.sha256}",
              f"dataset {lin.get('dataset_version')} | train run {lin.get('train_run')} | "
              f"gate run {lin.get('gate_run')} ({lin.get('gate_decision')})"]
    spec = ModelfileSpec(base=w.base_ref, base_is_path=w.base_is_path, chat=src.chat, adapter=w.adapter_ref,
                         system=src.system_text, parameters=parameters, license=cfg.license, header=header)
    text, mf_warnings = write(spec)
    warnings += mf_warnings
    check_modelfile(text, tmp, cfg.mode)
    (tmp / "Modelfile").write_text(text, encoding="utf-8")
    create_cmd = create_command(src.name, src.out_dir.resolve() / "Modelfile")
    final_system = src.system_text if src.system_text is not None else src.chat.default_system
    readme_text = readme(lin, name=src.name, files=w.files, warnings=warnings, system=final_system,
                         create_cmd=create_cmd, mode=cfg.mode, quantize=cfg.quantize,
                         request_system=src.request_system)
    check_readme(readme_text, lin, cfg.quantize)
    (tmp / "README.md").write_text(readme_text, encoding="utf-8")
    lin.update(mode=cfg.mode, quantize=cfg.quantize, gguf_check=w.export.get("check"))
    write_json(tmp / "lineage.json", {**lin, "files": w.files, "warnings": warnings})
    # GGUFs are large and rebuilt by `flywheel publish`: keep them out of git if the folder is in a repo.
    (tmp / ".gitignore").write_text("# written by flywheel publish: GGUF files are rebuilt, not versioned\n"
                                    "*.gguf\n", encoding="utf-8")
    return create_cmd


# ---------------------------------------------------------------------------------------------- CLI (merge)

def _main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m flywheel.training.export")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge a LoRA adapter into its base and save a HF directory")
    m.add_argument("base")
    m.add_argument("adapter")
    m.add_argument("dest")
    m.add_argument("--tokenizer")
    m.add_argument("--chat-template-file")
    m.add_argument("--result", help="write the result as JSON here")
    a = ap.parse_args(argv)
    template = Path(a.chat_template_file).read_text(encoding="utf-8") if a.chat_template_file else None
    try:
        res = merge_lora(Path(a.base), Path(a.adapter), Path(a.dest),
                         tokenizer_dir=Path(a.tokenizer) if a.tokenizer else None, chat_template=template)
    except ExportError as e:
        print(str(e), file=sys.stderr)
        return 2
    text = json.dumps(res)
    if a.result:
        Path(a.result).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
