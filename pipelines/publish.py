"""`flywheel publish`: a registered adapter becomes an Ollama-ready folder that behaves like what was evaluated.

    flywheel publish MODEL_URI [--out Modelfiles/<name>] [--system TEXT] [--config configs/publish.yaml] [k=v ...]

Writes, atomically (a failed publish leaves the previous folder intact):
    Modelfile          FROM (the base the adapter was trained on), ADAPTER, TEMPLATE, PARAMETER stop..., sampling
                       parameters, SYSTEM (the winning prompt variant, or --system), LICENSE
    adapter/           the PEFT safetensors adapter (Ollama takes it for Llama-family bases)
    adapter.gguf       the same adapter converted by llama.cpp's convert_lora_to_gguf.py, when available
    base.gguf          the base converted from the exact weights the adapter was trained on (`base: gguf`)
    README.md          lineage: logs -> dataset version -> train run -> eval -> gate decision
    lineage.json       the same, as data

Why each choice:
- The base is checked by hash: the adapter records the sha256 of the weights it was trained on and publish
  refuses any other base. An adapter on the wrong base loads fine and produces gibberish.
- TEMPLATE and stop tokens are derived from the tokenizer (`flywheel.training.modelfile.derive_chat_format`), never
  typed in; the Modelfile is parsed back before it is written.
- `base: gguf` converts the dequantized base (f16) into the folder: llama.cpp with that base and the GGUF adapter
  matched PEFT token for token in our check (bench/bench_llamacpp.py). `base: ollama` names an Ollama model
  instead (smaller folder; its weights are Ollama's own quantization, so outputs drift slightly).
- When llama.cpp's converters are not installed (`make llama-cpp-converters`), the folder still gets the
  Modelfile and the safetensors adapter, and publish says clearly that no GGUF was produced.

Python entry: `run_publish(model_uri, out=None, system=None, cfg=None) -> {out, modelfile, run_id, gguf_adapter,
base_gguf, warnings, ollama_create}`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, Optional

import typer
from pydantic import Field

from flywheel.pipelines.config import StageConfig, load_config
from flywheel.foundation.errors import InputError

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


class PublishConfig(StageConfig):
    out: Optional[str] = None                 # default Modelfiles/<model name or run id>
    system: Optional[str] = None              # overrides the winning prompt variant's system prompt
    base: Literal["gguf", "ollama"] = "gguf"  # FROM ./base.gguf (exact weights) or an Ollama model name
    ollama_base: str = "smollm2:135m"         # FROM for `base: ollama` (and the fallback without converters)
    gguf_adapter: bool = True                 # convert the adapter with llama.cpp's convert_lora_to_gguf.py
    gguf_outtype: Literal["f16", "f32", "q8_0"] = "f16"
    llama_cpp_dir: Optional[str] = None       # converters; default $FLYWHEEL_LLAMA_CPP or <venv>/share/flywheel/llama.cpp
    convert_timeout_s: int = Field(900, gt=0)
    parameters: dict[str, Any] = Field(default_factory=lambda: {
        "temperature": 0.0,   # the eval generated greedily: the published model should answer the same way
        "top_p": 0.95,
        "num_ctx": 2048,      # SmolLM2 was trained with 8k; 2k keeps Ollama's memory small
        "num_predict": 256,
    })
    license: str = ("Apache-2.0. Base model: HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0). "
                    "LoRA adapter trained by Flywheel on the logs named in README.md.")
    model_cache: Optional[str] = None
    tracking_uri: Optional[str] = None
    run_name: Optional[str] = None


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


def _run_converter(script: Path, args: list[str], timeout: int) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converters must use their own gguf-py: PyPI's gguf lags behind them
    try:
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise InputError(f"{script.name}: timed out after {timeout}s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise InputError(f"{script.name} failed (exit {proc.returncode}): {' | '.join(tail)[:400]}")


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
    if not path.exists() or path.stat().st_size < 32:
        raise InputError(f"{path}: missing or empty GGUF")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(f"{path}: not a GGUF file (bad magic)")
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    kind = None
    if "general.type" in fields:
        fld = fields["general.type"]
        kind = bytes(fld.parts[fld.data[0]]).decode()
    ok = kind == "adapter" if expect_type == "adapter" else kind in ("model", None)
    if expect_type and not ok:
        raise InputError(f"{path}: general.type is {kind!r}, expected {expect_type!r}")
    return {"type": kind, "size": path.stat().st_size}


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


# -- lineage --------------------------------------------------------------------------------------------------

def lineage(model: Any) -> dict:
    """Walk back from the model version: gate run, eval run, train run, dataset version, mine run, input logs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    tags, meta = dict(model.tags or {}), dict(model.meta or {})
    out: dict[str, Any] = {
        "model_uri": model.uri, "registered_model": model.name, "version": model.version,
        "base_model": meta.get("base_model"), "base_model_sha256": meta.get("base_model_sha256"),
        "dataset_version": meta.get("dataset_version") or tags.get("flywheel.dataset_version"),
        "train_run": meta.get("train_run_id") or model.run_id, "mine_run": meta.get("mine_run_id"),
        "eval_run": tags.get("flywheel.input.eval_run"), "gate_run": tags.get("flywheel.input.gate_run"),
        "prompt_variant": tags.get("flywheel.prompt_variant"),
    }

    def run_tags(run_id):
        if not run_id:
            return {}, {}
        try:
            r = client.get_run(run_id)
            return dict(r.data.tags), dict(r.data.params)
        except Exception:
            return {}, {}

    t, _ = run_tags(out["gate_run"])
    out["gate_decision"] = t.get("flywheel.gate.decision")
    t, _ = run_tags(out["train_run"])
    out["mine_run"] = out["mine_run"] or t.get("flywheel.input.mine_run")
    t, params = run_tags(out["mine_run"])
    out["logs"] = [x for x in t.get("flywheel.input.logs", "").split(",") if x] or None
    out["dataset_path"] = t.get("flywheel.dataset_path")
    # Mined by `flywheel run`? Then the mine inputs were slices of the real logs, named on the mine run.
    try:
        sources = json.loads(t.get("flywheel.loop.sources", "[]"))
    except json.JSONDecodeError:
        sources = []
    if sources:
        out["logs"] = [f"{s['path']} (bytes {s['start']}-{s['end']})" for s in sources]
    return out


def readme(lin: dict, *, name: str, files: dict[str, str | None], warnings: list[str], system: str | None,
           create_cmd: str) -> str:
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
    ]
    lines = [f"# {name}", "", "Published by `flywheel publish`. Run it with Ollama:", "", "```bash",
             create_cmd, f"ollama run {name}", "```", "", "## Lineage", "", "| step | value |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    lines += ["", "## Files", ""] + [f"- `{k}`: {v_ or 'not produced'}" for k, v_ in files.items()]
    if system:
        lines += ["", "## System prompt", "", "```text", system, "```"]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"


# -- the stage ------------------------------------------------------------------------------------------------

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
    return derive_chat_format(render, specials, eos)


def run_publish(model_uri: str, out: str | Path | None = None, system: str | None = None,
                cfg: PublishConfig | None = None) -> dict:
    """Publish `model_uri` (models:/name@champion, models:/name/3, runs:/…, run id, adapter dir)."""
    import mlflow

    from flywheel.pipelines import registry, tracking
    from flywheel.foundation.io import atomic_dir, write_json
    from flywheel.training.modelfile import ModelfileSpec, write
    from flywheel.training.models import resolve_base_model

    cfg = cfg or PublishConfig()
    tracking.setup(cfg.tracking_uri)
    model = registry.resolve_model(model_uri, "model")
    meta = model.meta
    name = (model.name or f"flywheel-{(model.run_id or 'adapter')[:8]}").lower()
    out_dir = Path(out or cfg.out or Path("Modelfiles") / name)
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
    chat = chat_format_from_tokenizer(tok_dir, meta)
    system_text = system if system is not None else cfg.system
    if system_text is None:
        system_text = model.tags.get("flywheel.system_prompt") or None
    if system_text is None:
        warnings.append("no system prompt recorded for this model (no winning prompt variant): using the "
                        "tokenizer's default")

    llama_cpp = converters_dir(cfg.llama_cpp_dir)
    files: dict[str, str | None] = {"Modelfile": "Ollama Modelfile", "adapter/": "PEFT safetensors adapter"}
    with atomic_dir(out_dir) as tmp:
        (tmp / "adapter").mkdir()
        for f in ADAPTER_FILES:
            src = model.adapter_dir / f
            if not src.exists():
                raise InputError(f"{model.adapter_dir}: {f} missing")
            shutil.copyfile(src, tmp / "adapter" / f)
        gguf_adapter = base_gguf = None
        if cfg.gguf_adapter:
            if llama_cpp is None:
                warnings.append("GGUF adapter NOT produced: llama.cpp's converters are not installed "
                                "(run `make llama-cpp-converters` or set FLYWHEEL_LLAMA_CPP); the Modelfile "
                                "uses the safetensors adapter")
            else:
                gguf_adapter = convert_adapter(tmp / "adapter", info.path, tmp / "adapter.gguf", llama_cpp,
                                               cfg.gguf_outtype, cfg.convert_timeout_s)
        files["adapter.gguf"] = "GGUF LoRA adapter (llama.cpp convert_lora_to_gguf.py)" if gguf_adapter else None
        base_ref, base_is_path = cfg.ollama_base, False
        if cfg.base == "gguf":
            if llama_cpp is None:
                warnings.append(f"base.gguf NOT produced (no llama.cpp converters): FROM {cfg.ollama_base}, "
                                "Ollama's own weights, which may differ slightly from the evaluated base")
            else:
                cached = _cached_base_gguf(info.path, info.sha256, llama_cpp, cfg.gguf_outtype,
                                           cfg.convert_timeout_s)
                _link_or_copy(cached, tmp / "base.gguf")
                base_gguf = tmp / "base.gguf"
                base_ref, base_is_path = "./base.gguf", True
        files["base.gguf"] = f"{info.name} converted to GGUF ({cfg.gguf_outtype})" if base_gguf else None

        lin = lineage(model)
        header = [f"Published by flywheel publish from {model.uri}",
                  f"base {info.name} sha256 {info.sha256}",
                  f"dataset {lin.get('dataset_version')} | train run {lin.get('train_run')} | "
                  f"gate run {lin.get('gate_run')} ({lin.get('gate_decision')})"]
        spec = ModelfileSpec(base=base_ref, base_is_path=base_is_path, chat=chat,
                             adapter="./adapter.gguf" if gguf_adapter else "./adapter", system=system_text,
                             parameters=cfg.parameters, license=cfg.license, header=header)
        text, mf_warnings = write(spec)
        warnings += mf_warnings
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
        create_cmd = f"ollama create {name} -f {out_dir.resolve() / 'Modelfile'}"
        final_system = system_text if system_text is not None else chat.default_system
        (tmp / "README.md").write_text(readme(lin, name=name, files=files, warnings=warnings, system=final_system,
                                              create_cmd=create_cmd), encoding="utf-8")
        write_json(tmp / "lineage.json", {**lin, "files": files, "warnings": warnings})
        # GGUFs are large and rebuilt by `flywheel publish`: keep them out of git if the folder is in a repo.
        (tmp / ".gitignore").write_text("# written by flywheel publish: GGUF files are rebuilt, not versioned\n"
                                        "*.gguf\n", encoding="utf-8")
        # Temp files are private (0600/0700); a published folder is meant to be read by others (ollama, CI).
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)

    inputs = {"model_uri": model.uri, "train_run": lin.get("train_run"), "gate_run": lin.get("gate_run"),
              "dataset_version": lin.get("dataset_version")}
    with tracking.start_run("publish", cfg.run_name or f"publish-{name}", inputs=inputs,
                            configured_uri=cfg.tracking_uri,
                            tags={"flywheel.modelfile_path": str((out_dir / "Modelfile").resolve()),
                                  "flywheel.publish.gguf_adapter": "yes" if gguf_adapter else "no",
                                  "flywheel.base_model_sha256": info.sha256},
                            params={"base": cfg.base, "gguf_outtype": cfg.gguf_outtype,
                                    **{f"parameters.{k}": v for k, v in cfg.parameters.items()}}) as run:
        mlflow.log_artifact(str(out_dir / "Modelfile"))
        mlflow.log_artifact(str(out_dir / "README.md"))
        mlflow.log_artifact(str(out_dir / "lineage.json"))
    return {"out": str(out_dir.resolve()), "modelfile": str((out_dir / "Modelfile").resolve()), "run_id": run.info.run_id,
            "gguf_adapter": str(out_dir / "adapter.gguf") if gguf_adapter else None,
            "base_gguf": str(out_dir / "base.gguf") if base_gguf else None, "warnings": warnings,
            "ollama_create": create_cmd, "name": name}


def register(app: typer.Typer) -> None:
    @app.command("publish")
    def publish_cmd(
        model_uri: str = typer.Argument(..., help="models:/<name>@champion, models:/<name>/<v>, runs:/…, or a dir"),
        overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. base=ollama"),
        out: Optional[Path] = typer.Option(None, "--out", help="output folder (default Modelfiles/<name>)"),
        system: Optional[str] = typer.Option(None, "--system", help="system prompt (overrides the winning variant)"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config for publish"),
    ) -> None:
        """Write an Ollama Modelfile folder (Modelfile, adapter, GGUF adapter, README with lineage)."""
        cfg = load_config(PublishConfig, config, overrides or [])
        res = run_publish(model_uri, out=out, system=system, cfg=cfg)
        for w in res["warnings"]:
            typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
        typer.echo(f"published {res['out']}")
        typer.echo(f"Modelfile: {res['modelfile']}")
        typer.echo(f"GGUF adapter: {res['gguf_adapter'] or 'NOT produced (see warning)'}")
        typer.echo(f"next: {res['ollama_create']}")
