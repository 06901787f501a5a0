"""`flywheel publish`: a registered adapter becomes an Ollama-ready folder that behaves like what was evaluated.

    flywheel publish MODEL_URI [--out Modelfiles/<name>] [--system TEXT] [--config configs/publish.yaml] [k=v ...]

Writes, atomically (a failed publish leaves the previous folder intact, and no half-written one):
    Modelfile          FROM ./model.gguf, TEMPLATE, PARAMETER stop..., sampling parameters, SYSTEM (the static
                       part of the winning prompt variant, or --system), LICENSE. No ADAPTER line.
    model.gguf         `mode: merged` (default): the LoRA merged into the exact base weights it was trained on
                       (PEFT merge_and_unload), converted by llama.cpp's convert_hf_to_gguf.py as `quantize`
                       (f16 default, bf16, q8_0)
    base.gguf + adapter.gguf (+ adapter/)   `mode: adapter`: the older pair for llama.cpp `--lora` and Ollama
                       versions that still take ADAPTER
    README.md          lineage: logs -> dataset version -> train run -> eval -> gate decision; quantization; how
                       to send per-request context; Ollama version notes
    lineage.json       the same, as data

Why each choice:
- Merged by default: Ollama's ADAPTER support is narrow (one adapter; safetensors adapters convert only for
  llama/gemma2 bases) and newer Ollama releases are reported to reject ADAPTER at `ollama create`. A single
  merged GGUF loads in every llama.cpp-based runtime.
- The base is checked by hash: the adapter records the sha256 of the weights it was trained on and publish
  refuses any other base. An adapter on the wrong base loads fine and produces gibberish.
- TEMPLATE and stop tokens are derived from the tokenizer (`flywheel.training.modelfile.derive_chat_format`), never
  typed in; the Modelfile is parsed back before it is written, and the GGUF is read back: GGUF magic, the
  chat template, every stop token in its vocabulary, tensor count and types as merged (`flywheel.training.export`).
- SYSTEM holds only the variant's static text: fields filled per request (a grounded variant's retrieved
  context) are the application's to send; a placeholder baked into SYSTEM would be answered from forever.

Python entry: `run_publish(model_uri, out=None, system=None, cfg=None) -> {out, modelfile, run_id, mode, model_gguf,
gguf_adapter, base_gguf, quantize, peak_rss, seconds, warnings, ollama_create}`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from flywheel.pipelines.config import load_config
from flywheel.foundation.errors import FlywheelError, InputError
from flywheel.pipelines import tags as T
# The config type lives with the export core whose stage it configures.
from flywheel.training.export_config import PublishConfig

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def _eval_sampling() -> dict[str, Any]:
    """The sampling `flywheel eval` evaluates with, every parameter pinned (temperature 0 with top_k 1,
    repeat_penalty 1, min_p 0, seed, num_predict = the eval's max_new_tokens): Ollama's own defaults
    (repeat_penalty 1.1, ...) would answer otherwise."""
    from flywheel.evals.prompts.generate import GenParams

    return {**GenParams().modelfile_parameters(), "num_ctx": 2048}  # SmolLM2 has 8k; 2k keeps Ollama small


# -- llama.cpp converters -------------------------------------------------------------------------------------

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
    from flywheel.training.export import converter_env, run_measured

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
    from flywheel.training.export import ExportError, read_gguf

    try:
        info = read_gguf(path, converters_dir())
    except ExportError as e:
        raise InputError(str(e)) from None
    kind = info["type"]
    ok = kind == "adapter" if expect_type == "adapter" else kind in ("model", None)
    if expect_type and not ok:
        raise InputError(f"{path}: general.type is {kind!r}, expected {expect_type!r}")
    return {"type": kind, "size": info["size"], "tensors": len(info["tensors"])}


def _cached_base_gguf(base_dir: Path, sha256: str, llama_cpp: Path, outtype: str, timeout: int) -> Path:
    """Converting the base takes ~10 s and 270 MB: do it once per base hash, then hard-link into folders."""
    from flywheel.pipelines.tracking import flywheel_home

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


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# -- system prompt --------------------------------------------------------------------------------------------

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


def variant_system(variant: str | None) -> tuple[str, str, str] | None:
    """(static, per-request, full template text) of a prompt variant's system prompt, or None if not found."""
    if not variant:
        return None
    from flywheel.evals.prompts.templates import load_template

    search = Path(__file__).resolve().parents[1] / "configs" / "prompts"
    try:
        t = load_template(variant, search_dir=search)
    except FlywheelError:
        return None
    static, dynamic = split_system(t.system)
    return static, dynamic, t.system.strip()


def chat_api_example(name: str, static: str, dynamic: str) -> str:
    """An Ollama /api/chat request whose system message carries the static text plus the request's fields."""
    filled = FIELD_RE.sub(lambda m: "<" + re.sub(r"[{}%\s]", "", m.group(0)) + " for this request>", dynamic)
    body = {"model": name, "stream": False, "messages": [
        {"role": "system", "content": f"{static}\n\n{filled}"},
        {"role": "user", "content": "<the user's question>"}]}
    return "curl http://localhost:11434/api/chat -d " + shlex.quote(json.dumps(body, ensure_ascii=False))


# -- merged model ---------------------------------------------------------------------------------------------

def export_merged(adapter_dir: Path, base_dir: Path, tok_dir: Path, chat_template: str, stops: list[str],
                  dest: Path, llama_cpp: Path, quantize: str, timeout: int) -> dict:
    """Merge (child process), convert (child process), check; the merged HF copy lives only beside `dest`."""
    from flywheel.training.export import ExportError, check_merged_gguf, convert_hf, merge_in_subprocess

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


# -- lineage --------------------------------------------------------------------------------------------------

def lineage(model: Any) -> dict:
    """Walk back from the model version (pipelines/lineage.py): gate, eval, train and mine runs, dataset, logs."""
    import mlflow

    from flywheel.pipelines.lineage import walk

    start = {"name": model.name, "version": model.version, "uri": model.uri, "run_id": model.run_id,
             "tags": dict(model.tags or {}), "meta": dict(model.meta or {})}
    out = walk(mlflow.get_tracking_uri(), start).ids()
    # Ids the adapter itself records stay in the README even when this store does not hold those runs.
    out["train_run"] = out["train_run"] or model.meta.get("train_run_id") or model.run_id
    out["mine_run"] = out["mine_run"] or model.meta.get("mine_run_id")
    out["eval_run"] = out["eval_run"] or (model.tags or {}).get(T.input_tag(T.IN_EVAL_RUN))
    out["gate_run"] = out["gate_run"] or (model.tags or {}).get(T.input_tag(T.IN_GATE_RUN))
    return out


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


def _write_adapter_pair(tmp: Path, adapter_dir: Path, info: Any, llama_cpp: Path | None, cfg: PublishConfig,
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
            cached = _cached_base_gguf(info.path, info.sha256, llama_cpp, cfg.quantize, cfg.convert_timeout_s)
            _link_or_copy(cached, tmp / "base.gguf")
            base_gguf = tmp / "base.gguf"
            base_ref, base_is_path = "./base.gguf", True
    files["base.gguf"] = f"{info.name} converted to GGUF ({cfg.quantize})" if base_gguf else None
    return files, base_ref, base_is_path, "./adapter.gguf" if gguf_adapter else "./adapter", gguf_adapter, base_gguf


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


# -- the stage ------------------------------------------------------------------------------------------------

def _ollama_name(name: str) -> str:
    """`name` if Ollama takes it as a model name, else a one-line InputError (a shell-safe `ollama create`
    line is only half the fix: `-rf` or `a b` would still fail, or mean something else, in Ollama)."""
    from flywheel.training.modelfile import ModelfileError, check_model_name

    try:
        return check_model_name(name)
    except ModelfileError as e:
        raise InputError(f"{e}; choose one with `name=<ollama name>`") from None


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


def run_publish(model_uri: str, out: str | Path | None = None, system: str | None = None,
                cfg: PublishConfig | None = None) -> dict:
    """Publish `model_uri` (models:/name@champion, models:/name/3, runs:/…, run id, adapter dir)."""
    import mlflow

    from flywheel.pipelines import registry, tracking
    from flywheel.foundation.io import atomic_dir, check_output_dir, write_json
    from flywheel.training.modelfile import ModelfileSpec, create_command, write
    from flywheel.training.models import resolve_base_model

    cfg = cfg or PublishConfig()
    parameters = cfg.parameters if cfg.parameters is not None else _eval_sampling()
    if cfg.name is not None:
        _ollama_name(cfg.name)  # before any work: a bad name given by hand fails first
    tracking.setup(cfg.tracking_uri)
    model = registry.resolve_model(model_uri, "model")
    meta = model.meta
    name = _ollama_name(cfg.name or (model.name or f"flywheel-{(model.run_id or 'adapter')[:8]}").lower())
    out_dir = Path(out or cfg.out or Path("Modelfiles") / name)
    check_output_dir(out_dir, inputs=[model.adapter_dir], force=cfg.force)  # before any conversion work
    warnings: list[str] = []

    # 1. the base, by hash
    base_name, recorded = meta.get("base_model"), meta.get("base_model_sha256")
    if not base_name or not recorded:
        raise InputError(f"{model.adapter_dir}/flywheel_adapter.json: base_model / base_model_sha256 missing; "
                         "cannot prove which base this adapter belongs to")
    info = resolve_base_model(base_name, cfg.model_cache)
    if info.sha256 != recorded:
        raise InputError(f"adapter {model.label} was trained on {base_name} sha256 {recorded[:12]}…, but "
                         f"{info.path} has sha256 {info.sha256[:12]}…: refusing to publish on another base")

    # 2. template + stops from the tokenizer the adapter carries (else the base's)
    tok_dir = model.adapter_dir if (model.adapter_dir / "tokenizer_config.json").exists() else info.path
    chat, chat_template = chat_format_from_tokenizer(tok_dir, meta)

    # 3. SYSTEM: only what is the same for every request
    variant = model.tags.get(T.PROMPT_VARIANT)
    parts = variant_system(variant)
    request_system = None
    explicit = system if system is not None else cfg.system
    if explicit is not None:
        system_text = static_system(explicit, "--system")
    elif parts is not None:
        system_text = static_system(parts[0], f"prompt variant {variant!r}")
        request_system = (parts[0], parts[1]) if parts[1] else None
    else:
        system_text = static_system(model.tags.get(T.SYSTEM_PROMPT) or None, "flywheel.system_prompt tag")
        if system_text is None:
            warnings.append("no system prompt recorded for this model (no winning prompt variant): using the "
                            "tokenizer's default")
        elif variant:
            warnings.append(f"prompt variant {variant!r} not found under configs/prompts: SYSTEM is the system "
                            "prompt recorded at promotion, as is")

    # 4. converters: merged mode cannot do without them, so fail before anything is written
    llama_cpp = converters_dir(cfg.llama_cpp_dir)
    if cfg.mode == "merged":
        if cfg.base != "gguf":
            raise InputError("base=ollama applies to mode=adapter only: a merged model carries its own weights")
        if llama_cpp is None or not (llama_cpp / "convert_hf_to_gguf.py").exists():
            raise InputError("mode=merged needs llama.cpp's convert_hf_to_gguf.py: run `make llama-cpp-converters` "
                             "or set FLYWHEEL_LLAMA_CPP (or publish mode=adapter)")
    else:
        warnings.append(ADAPTER_CAVEAT)

    t0 = time.perf_counter()
    export: dict[str, Any] = {}
    gguf_adapter = base_gguf = model_gguf = None
    with atomic_dir(out_dir, force=cfg.force, inputs=[model.adapter_dir], stage="publish") as tmp:
        if cfg.mode == "merged":
            export = export_merged(model.adapter_dir, info.path, tok_dir, chat_template, list(chat.stop),
                                   tmp / "model.gguf", llama_cpp, cfg.quantize, cfg.convert_timeout_s)
            model_gguf = tmp / "model.gguf"
            files: dict[str, str | None] = {
                "Modelfile": "Ollama Modelfile (no ADAPTER line)",
                "model.gguf": f"{info.name} + LoRA merged (PEFT merge_and_unload), GGUF {cfg.quantize} "
                              f"({export['check']['tensors']} tensors)"}
            base_ref, base_is_path, adapter_ref = "./model.gguf", True, None
        else:
            files, base_ref, base_is_path, adapter_ref, gguf_adapter, base_gguf = _write_adapter_pair(
                tmp, model.adapter_dir, info, llama_cpp, cfg, warnings)

        lin = lineage(model)
        header = [f"Published by flywheel publish from {model.uri} (mode {cfg.mode}, {cfg.quantize})",
                  f"base {info.name} sha256 {info.sha256}",
                  f"dataset {lin.get('dataset_version')} | train run {lin.get('train_run')} | "
                  f"gate run {lin.get('gate_run')} ({lin.get('gate_decision')})"]
        spec = ModelfileSpec(base=base_ref, base_is_path=base_is_path, chat=chat, adapter=adapter_ref,
                             system=system_text, parameters=parameters, license=cfg.license, header=header)
        text, mf_warnings = write(spec)
        warnings += mf_warnings
        check_modelfile(text, tmp, cfg.mode)
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
        create_cmd = create_command(name, out_dir.resolve() / "Modelfile")
        final_system = system_text if system_text is not None else chat.default_system
        readme_text = readme(lin, name=name, files=files, warnings=warnings, system=final_system,
                             create_cmd=create_cmd, mode=cfg.mode, quantize=cfg.quantize,
                             request_system=request_system)
        check_readme(readme_text, lin, cfg.quantize)
        (tmp / "README.md").write_text(readme_text, encoding="utf-8")
        lin.update(mode=cfg.mode, quantize=cfg.quantize, gguf_check=export.get("check"))
        write_json(tmp / "lineage.json", {**lin, "files": files, "warnings": warnings})
        # GGUFs are large and rebuilt by `flywheel publish`: keep them out of git if the folder is in a repo.
        (tmp / ".gitignore").write_text("# written by flywheel publish: GGUF files are rebuilt, not versioned\n"
                                        "*.gguf\n", encoding="utf-8")
        # Temp files are private (0600/0700); a published folder is meant to be read by others (ollama, CI).
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    seconds = time.perf_counter() - t0
    peak_rss = {"publish": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "merge": export.get("peak_rss_merge"), "convert": export.get("peak_rss_convert")}

    inputs = {T.IN_MODEL_URI: model.uri, T.IN_TRAIN_RUN: lin.get("train_run"), T.IN_GATE_RUN: lin.get("gate_run"),
              T.IN_DATASET_VERSION: lin.get("dataset_version")}
    with tracking.start_run("publish", cfg.run_name or f"publish-{name}", inputs=inputs,
                            configured_uri=cfg.tracking_uri,
                            tags={T.MODELFILE_PATH: str((out_dir / "Modelfile").resolve()),
                                  T.PUBLISH_GGUF_ADAPTER: "yes" if gguf_adapter else "no",
                                  T.PUBLISH_MODE: cfg.mode,
                                  T.BASE_MODEL_SHA256: info.sha256},
                            params={"mode": cfg.mode, "base": cfg.base, "quantize": cfg.quantize,
                                    **{f"parameters.{k}": v for k, v in parameters.items()}}) as run:
        mlflow.log_artifact(str(out_dir / "Modelfile"))
        mlflow.log_artifact(str(out_dir / "README.md"))
        mlflow.log_artifact(str(out_dir / "lineage.json"))
        mlflow.log_metrics({"publish_s": seconds, **{f"peak_rss_mb.{k}": v / 2**20 for k, v in peak_rss.items() if v}})
    return {"out": str(out_dir.resolve()), "modelfile": str((out_dir / "Modelfile").resolve()), "run_id": run.info.run_id,
            "mode": cfg.mode, "quantize": cfg.quantize, "seconds": seconds, "peak_rss": peak_rss,
            "model_gguf": str(out_dir / "model.gguf") if model_gguf else None,
            "gguf_adapter": str(out_dir / "adapter.gguf") if gguf_adapter else None,
            "base_gguf": str(out_dir / "base.gguf") if base_gguf else None, "warnings": warnings,
            "ollama_create": create_cmd, "name": name}


def register(app: typer.Typer) -> None:
    @app.command("publish")
    def publish_cmd(
        model_uri: str = typer.Argument(..., help="models:/<name>@champion, models:/<name>/<v>, runs:/…, or a dir"),
        overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. quantize=q8_0 mode=adapter"),
        out: Optional[Path] = typer.Option(None, "--out", help="output folder (default Modelfiles/<name>)"),
        system: Optional[str] = typer.Option(None, "--system", help="system prompt (overrides the winning variant)"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config for publish"),
        force: bool = typer.Option(False, "--force", help="replace an existing --out directory Flywheel did not write"),
    ) -> None:
        """Write an Ollama Modelfile folder (Modelfile + merged model.gguf, or base + adapter; README with lineage)."""
        cfg = load_config(PublishConfig, config, (overrides or []) + (["force=true"] if force else []))
        res = run_publish(model_uri, out=out, system=system, cfg=cfg)
        for w in res["warnings"]:
            typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
        typer.echo(f"published {res['out']}")
        typer.echo(f"Modelfile: {res['modelfile']}")
        if res["mode"] == "merged":
            typer.echo(f"model: {res['model_gguf']} ({res['quantize']}, LoRA merged) in {res['seconds']:.0f} s")
        else:
            typer.echo(f"GGUF adapter: {res['gguf_adapter'] or 'NOT produced (see warning)'}")
        typer.echo(f"next: {res['ollama_create']}")
