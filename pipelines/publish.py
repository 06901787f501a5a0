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

import resource
import time
from pathlib import Path
from typing import Any, Optional

import typer

from flywheel.pipelines.config import load_config
from flywheel.foundation.errors import FlywheelError
from flywheel.pipelines import tags as T
# The config type and the folder's steps live with the export core; some re-exported for the stage's callers.
from flywheel.training import export
from flywheel.training.export import (check_gguf, convert_adapter, convert_base, converters_dir,  # noqa: F401
                                      split_system, static_system)
from flywheel.training.export_config import PublishConfig


def _eval_sampling() -> dict[str, Any]:
    """The sampling `flywheel eval` evaluates with, every parameter pinned (temperature 0 with top_k 1,
    repeat_penalty 1, min_p 0, seed, num_predict = the eval's max_new_tokens): Ollama's own defaults
    (repeat_penalty 1.1, ...) would answer otherwise."""
    from flywheel.evals.prompts.generate import GenParams

    return {**GenParams().modelfile_parameters(), "num_ctx": 2048}  # SmolLM2 has 8k; 2k keeps Ollama small


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


# -- the stage ------------------------------------------------------------------------------------------------

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


def _resolve(model_uri: str, out: str | Path | None, system: str | None, cfg: PublishConfig) -> export.Source:
    """Phases 1-4, everything checked before any conversion work."""
    from flywheel.foundation.io import check_output_dir
    from flywheel.pipelines import registry

    model = registry.resolve_model(model_uri, "model")
    name = export.ollama_name(cfg.name or (model.name or f"flywheel-{(model.run_id or 'adapter')[:8]}").lower())
    out_dir = Path(out or cfg.out or Path("Modelfiles") / name)
    check_output_dir(out_dir, inputs=[model.adapter_dir], force=cfg.force)  # before any conversion work
    warnings: list[str] = []
    info = export.verified_base(model, cfg)  # 1. the base, by hash
    # 2. template + stops from the tokenizer the adapter carries (else the base's)
    tok_dir = model.adapter_dir if (model.adapter_dir / "tokenizer_config.json").exists() else info.path
    chat, chat_template = export.chat_format_from_tokenizer(tok_dir, model.meta)
    system_text, request_system = _system_prompt(model, system, cfg, warnings)
    llama_cpp = export.check_converters(cfg, warnings)  # 4. before anything is written
    return export.Source(model, name, out_dir, info, tok_dir, chat, chat_template, system_text, request_system,
                         llama_cpp, warnings)


def _log_publish(src: export.Source, w: export.Weights, lin: dict, cfg: PublishConfig, parameters: dict,
                 seconds: float, peak_rss: dict) -> str:
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
        export.ollama_name(cfg.name)  # before any work: a bad name given by hand fails first
    tracking.setup(cfg.tracking_uri)
    src = _resolve(model_uri, out, system, cfg)
    out_dir = src.out_dir

    t0 = time.perf_counter()
    with atomic_dir(out_dir, force=cfg.force, inputs=[src.model.adapter_dir], stage="publish") as tmp:
        w = export.write_weights(tmp, src, cfg)
        lin = lineage(src.model)
        create_cmd = export.write_docs(tmp, src, w, cfg, parameters, lin)
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
