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

import os
import shutil
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer

from flywheel.pipelines.config import load_config
from flywheel.foundation.errors import FlywheelError, InputError
from flywheel.pipelines import tags as T
# The config type and the folder's pure parts live with the export core; imported here for the stage's callers.
from flywheel.training.export import (ADAPTER_CAVEAT, check_gguf, check_modelfile, check_readme,  # noqa: F401
                                      convert_adapter, convert_base, converters_dir, readme, split_system,
                                      static_system)
from flywheel.training.export_config import PublishConfig

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def _eval_sampling() -> dict[str, Any]:
    """The sampling `flywheel eval` evaluates with, every parameter pinned (temperature 0 with top_k 1,
    repeat_penalty 1, min_p 0, seed, num_predict = the eval's max_new_tokens): Ollama's own defaults
    (repeat_penalty 1.1, ...) would answer otherwise."""
    from flywheel.evals.prompts.generate import GenParams

    return {**GenParams().modelfile_parameters(), "num_ctx": 2048}  # SmolLM2 has 8k; 2k keeps Ollama small


# -- llama.cpp converters -------------------------------------------------------------------------------------

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


@dataclass
class _Source:
    """What phases 1-4 resolved, before anything is written."""

    model: Any
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
class _Weights:
    """What the weights step wrote into the folder, and how the Modelfile refers to it."""

    files: dict[str, str | None]
    base_ref: str
    base_is_path: bool
    adapter_ref: str | None
    export: dict[str, Any] = field(default_factory=dict)
    model_gguf: Path | None = None
    gguf_adapter: Path | None = None
    base_gguf: Path | None = None


def _verified_base(model: Any, cfg: PublishConfig) -> Any:
    """Phase 1: the base, by hash: an adapter on the wrong base loads fine and produces gibberish."""
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


def _system_prompt(model: Any, system: str | None, cfg: PublishConfig,
                   warnings: list[str]) -> tuple[str | None, tuple[str, str] | None]:
    """Phase 3, SYSTEM: only what is the same for every request. -> (SYSTEM text, (static, per-request) parts
    for the README when the variant has per-request fields)."""
    variant = model.tags.get(T.PROMPT_VARIANT)
    parts = variant_system(variant)
    explicit = system if system is not None else cfg.system
    if explicit is not None:
        return static_system(explicit, "--system"), None
    if parts is not None:
        return static_system(parts[0], f"prompt variant {variant!r}"), ((parts[0], parts[1]) if parts[1] else None)
    system_text = static_system(model.tags.get(T.SYSTEM_PROMPT) or None, "flywheel.system_prompt tag")
    if system_text is None:
        warnings.append("no system prompt recorded for this model (no winning prompt variant): using the "
                        "tokenizer's default")
    elif variant:
        warnings.append(f"prompt variant {variant!r} not found under configs/prompts: SYSTEM is the system "
                        "prompt recorded at promotion, as is")
    return system_text, None


def _converters(cfg: PublishConfig, warnings: list[str]) -> Path | None:
    """Phase 4: merged mode cannot do without llama.cpp's converters, so fail before anything is written."""
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


def _resolve(model_uri: str, out: str | Path | None, system: str | None, cfg: PublishConfig) -> _Source:
    """Phases 1-4, everything checked before any conversion work."""
    from flywheel.foundation.io import check_output_dir
    from flywheel.pipelines import registry

    model = registry.resolve_model(model_uri, "model")
    name = _ollama_name(cfg.name or (model.name or f"flywheel-{(model.run_id or 'adapter')[:8]}").lower())
    out_dir = Path(out or cfg.out or Path("Modelfiles") / name)
    check_output_dir(out_dir, inputs=[model.adapter_dir], force=cfg.force)  # before any conversion work
    warnings: list[str] = []
    info = _verified_base(model, cfg)
    # 2. template + stops from the tokenizer the adapter carries (else the base's)
    tok_dir = model.adapter_dir if (model.adapter_dir / "tokenizer_config.json").exists() else info.path
    chat, chat_template = chat_format_from_tokenizer(tok_dir, model.meta)
    system_text, request_system = _system_prompt(model, system, cfg, warnings)
    llama_cpp = _converters(cfg, warnings)
    return _Source(model, name, out_dir, info, tok_dir, chat, chat_template, system_text, request_system,
                   llama_cpp, warnings)


def _write_weights(tmp: Path, src: _Source, cfg: PublishConfig) -> _Weights:
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
        return _Weights(files, "./model.gguf", True, None, export=export, model_gguf=tmp / "model.gguf")
    files, base_ref, base_is_path, adapter_ref, gguf_adapter, base_gguf = _write_adapter_pair(
        tmp, src.model.adapter_dir, info, src.llama_cpp, cfg, src.warnings)
    return _Weights(files, base_ref, base_is_path, adapter_ref, gguf_adapter=gguf_adapter, base_gguf=base_gguf)


def _write_docs(tmp: Path, src: _Source, w: _Weights, cfg: PublishConfig, parameters: dict) -> tuple[dict, str]:
    """Modelfile, README.md, lineage.json and .gitignore, each checked before it is written.
    -> (lineage, the `ollama create` command)."""
    from flywheel.foundation.io import write_json
    from flywheel.training.modelfile import ModelfileSpec, create_command, write

    model, info, warnings = src.model, src.info, src.warnings
    lin = lineage(model)
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
    return lin, create_cmd


def _log_publish(src: _Source, w: _Weights, lin: dict, cfg: PublishConfig, parameters: dict, seconds: float,
                 peak_rss: dict) -> str:
    """The `flywheel/publish` run: lineage inputs, the folder's text files, timings. -> run id."""
    import mlflow

    from flywheel.pipelines import tracking

    out_dir = src.out_dir
    inputs = {T.IN_MODEL_URI: src.model.uri, T.IN_TRAIN_RUN: lin.get("train_run"),
              T.IN_GATE_RUN: lin.get("gate_run"), T.IN_DATASET_VERSION: lin.get("dataset_version")}
    with tracking.start_run("publish", cfg.run_name or f"publish-{src.name}", inputs=inputs,
                            configured_uri=cfg.tracking_uri,
                            tags={T.MODELFILE_PATH: str((out_dir / "Modelfile").resolve()),
                                  T.PUBLISH_GGUF_ADAPTER: "yes" if w.gguf_adapter else "no",
                                  T.PUBLISH_MODE: cfg.mode,
                                  T.BASE_MODEL_SHA256: src.info.sha256},
                            params={"mode": cfg.mode, "base": cfg.base, "quantize": cfg.quantize,
                                    **{f"parameters.{k}": v for k, v in parameters.items()}}) as run:
        mlflow.log_artifact(str(out_dir / "Modelfile"))
        mlflow.log_artifact(str(out_dir / "README.md"))
        mlflow.log_artifact(str(out_dir / "lineage.json"))
        mlflow.log_metrics({"publish_s": seconds, **{f"peak_rss_mb.{k}": v / 2**20 for k, v in peak_rss.items() if v}})
        return run.info.run_id


def run_publish(model_uri: str, out: str | Path | None = None, system: str | None = None,
                cfg: PublishConfig | None = None) -> dict:
    """Publish `model_uri` (models:/name@champion, models:/name/3, runs:/…, run id, adapter dir)."""
    from flywheel.foundation.io import atomic_dir
    from flywheel.pipelines import tracking

    cfg = cfg or PublishConfig()
    parameters = cfg.parameters if cfg.parameters is not None else _eval_sampling()
    if cfg.name is not None:
        _ollama_name(cfg.name)  # before any work: a bad name given by hand fails first
    tracking.setup(cfg.tracking_uri)
    src = _resolve(model_uri, out, system, cfg)
    out_dir = src.out_dir

    t0 = time.perf_counter()
    with atomic_dir(out_dir, force=cfg.force, inputs=[src.model.adapter_dir], stage="publish") as tmp:
        w = _write_weights(tmp, src, cfg)
        lin, create_cmd = _write_docs(tmp, src, w, cfg, parameters)
        # Temp files are private (0600/0700); a published folder is meant to be read by others (ollama, CI).
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    seconds = time.perf_counter() - t0
    peak_rss = {"publish": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "merge": w.export.get("peak_rss_merge"), "convert": w.export.get("peak_rss_convert")}
    run_id = _log_publish(src, w, lin, cfg, parameters, seconds, peak_rss)
    return {"out": str(out_dir.resolve()), "modelfile": str((out_dir / "Modelfile").resolve()), "run_id": run_id,
            "mode": cfg.mode, "quantize": cfg.quantize, "seconds": seconds, "peak_rss": peak_rss,
            "model_gguf": str(out_dir / "model.gguf") if w.model_gguf else None,
            "gguf_adapter": str(out_dir / "adapter.gguf") if w.gguf_adapter else None,
            "base_gguf": str(out_dir / "base.gguf") if w.base_gguf else None, "warnings": src.warnings,
            "ollama_create": create_cmd, "name": src.name}


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
