"""`flywheel run`: the continuous fine-tuning loop as one command to schedule (cron, CI). And `flywheel history`.

    flywheel run --config configs/flywheel.yaml [key=value ...]
    flywheel history [MODEL_NAME] [--json]

One pass:
1. **New logs only.** For each input log file, `work_dir/state.json` remembers how many bytes were consumed and
   the hash of that prefix. Appended lines (complete lines only: a line being written stays for next time) are
   new; a file whose consumed prefix changed was rewritten and counts as new in full. No new bytes: nothing is
   run or logged, and the command says so.
2. **Mine** the new slices plus any still-pending ones (`flywheel.pipelines.mine.run_mine`).
3. **Threshold.** Fewer new kept records than `min_new_records` (the seed used 100): no training. The slices stay
   pending and are mined again together with the next logs, so small trickles add up instead of being lost.
4. **Train** on the mined dataset (`flywheel.pipelines.train.run_train`), **gate** the adapter against the champion
   (`flywheel.pipelines.gate.run_gate`, which runs the eval), and on a pass **promote** and **publish** the new
   champion (`flywheel.pipelines.publish.run_publish`).
5. A summary run in `flywheel/run` ties the stage runs together (tags `flywheel.input.<stage>_run`).

Training is on the new data only (fresh LoRA from the base): the gate then asks whether it beats the champion.
Exit code of `flywheel run`: the gate's (0 pass, 1 fail, 2 error); 0 when there was nothing to do or too little.

Python entry: `run_loop(cfg, log=None) -> {status, message, ...stage results}`; status is one of
`no_new_logs`, `skipped`, `pass`, `fail`, `error`. `demo_loop_config(logs, work_dir, **overrides)` builds the
config `flywheel demo` uses.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from pydantic import Field

from flywheel.pipelines.config import StageConfig, load_config
from flywheel.foundation.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
LINE_FORMATS = (".jsonl", ".ndjson", ".json")  # append-only logs: sliced by bytes at line ends
LOG_SUFFIXES = LINE_FORMATS + (".parquet", ".csv", ".tsv")


class LoopConfig(StageConfig):
    inputs: list[str] = Field(default_factory=list)  # log files or folders of them
    work_dir: str = ".flywheel/loop"                  # state.json, batches/, datasets/, train/, gate/
    min_new_records: int = Field(100, ge=0)           # fewer new kept records: skip training (seed: 100)
    model_name: str = "flywheel-demo"                 # registered model; its @champion is the baseline
    mine: dict[str, Any] = Field(default_factory=dict)    # MineConfig keys
    train_config: Optional[str] = "configs/train/smollm2-lora.yaml"
    train: dict[str, Any] = Field(default_factory=dict)   # TrainConfig keys on top (max_steps, ...)
    gate_config: Optional[str] = "configs/gate.yaml"
    gate: dict[str, Any] = Field(default_factory=dict)    # GateConfig keys on top (min_cases, eval: {...})
    eval_on_dataset: bool = True                      # gate on the mined eval split unless gate.eval.cases is set
    retry_pending: bool = False                       # re-mine pending slices even with no new logs
    promote: bool = True
    publish: bool = True
    publish_out: Optional[str] = None                 # default Modelfiles/<model_name>
    publish_config: dict[str, Any] = Field(default_factory=dict)  # PublishConfig keys
    tracking_uri: Optional[str] = None


def demo_loop_config(logs: str | Path, work_dir: str | Path, **overrides: Any) -> LoopConfig:
    """The loop on the demo logs: few CPU training steps, a small eval, thresholds sized for ~300 logs."""
    from flywheel.pipelines.train import DEMO_OVERRIDES

    data: dict[str, Any] = {
        "inputs": [str(logs)], "work_dir": str(work_dir), "min_new_records": 50, "model_name": "flywheel-demo",
        "train_config": None, "train": dict(DEMO_OVERRIDES),  # as `flywheel.pipelines.train.demo_config`: no YAML
        "gate": {"min_cases": 8, "eval": {"limit": 16, "variants": ["concise"]}, "guardrails": []},
        "publish_out": str(Path(work_dir) / "Modelfiles" / "flywheel-demo"),
    }
    for k, v in overrides.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    return LoopConfig.model_validate(data)


# -- new logs -------------------------------------------------------------------------------------------------

def expand_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for s in inputs:
        p = Path(s).expanduser()
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in LOG_SUFFIXES
                            and not q.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"inputs: {s}: no such file or directory")
    if not files:
        raise InputError(f"inputs: no log files in {inputs or '[] (set inputs=[path])'}")
    return [f.resolve() for f in files]


def _prefix_sha(path: Path, n: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = n
        while left > 0 and (block := f.read(min(1 << 20, left))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def new_slices(files: list[Path], state: dict) -> list[dict]:
    """For each file: {path, start, end, reason} of bytes not consumed yet (complete lines only)."""
    out = []
    seen = state.get("files", {})
    for f in files:
        size = f.stat().st_size
        rec = seen.get(str(f))
        start, reason = 0, "new file"
        if rec:
            if size >= rec["bytes"] and _prefix_sha(f, rec["bytes"]) == rec["sha256"]:
                start, reason = rec["bytes"], "appended"
            else:
                reason = "rewritten"
        end = size
        if f.suffix in LINE_FORMATS and end > start:
            with open(f, "rb") as fh:  # stop at the last newline: a line still being written waits
                fh.seek(start)
                chunk = fh.read(end - start)
            cut = chunk.rfind(b"\n")
            end = start + cut + 1 if cut >= 0 else start
        elif f.suffix not in LINE_FORMATS and rec and reason == "appended":
            end = start = size  # a binary table is either unchanged or new in full
        if end > start:
            out.append({"path": str(f), "start": start, "end": end, "reason": reason})
    return out


def write_slices(slices: list[dict], batch_dir: Path) -> list[str]:
    """Copy the new byte ranges into `batch_dir` (one file per source, original suffix kept)."""
    from flywheel.foundation.io import atomic_dir

    written = []
    with atomic_dir(batch_dir) as tmp:
        for i, s in enumerate(slices):
            src = Path(s["path"])
            dst = tmp / f"{i:03d}-{src.name}"
            with open(src, "rb") as fi, open(dst, "wb") as fo:
                fi.seek(s["start"])
                fo.write(fi.read(s["end"] - s["start"]))
            written.append(dst.name)
    return [str(batch_dir / w) for w in written]


def load_state(work: Path) -> dict:
    p = work / "state.json"
    if not p.exists():
        return {"files": {}, "pending": [], "runs": []}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{p}:{e.lineno}: invalid JSON ({e.msg}); fix or delete it to re-mine everything") from None


def save_state(work: Path, state: dict) -> None:
    from flywheel.foundation.io import write_json

    write_json(work / "state.json", state)


# -- the loop -------------------------------------------------------------------------------------------------

def _resolve(path: str | None) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    return p if p.exists() or p.is_absolute() else (ROOT / p if (ROOT / p).exists() else p)


def _stage_config(model, path: str | None, section: dict, extra: dict):
    from flywheel.pipelines.config import _deep_merge, read_yaml

    data = read_yaml(_resolve(path)) if path else {}
    data = _deep_merge(_deep_merge(data, section), extra)
    return load_config(model, None, [], base=data)


def run_loop(cfg: LoopConfig, log: Callable[[str], None] | None = None) -> dict:
    """One pass of the loop. Returns {status, message, batch, mine, train, gate, publish, run_id}."""
    import mlflow

    from flywheel.pipelines import tracking

    say = log or (lambda msg: None)
    work = Path(cfg.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    state = load_state(work)
    files = expand_inputs(cfg.inputs)
    slices = new_slices(files, state)
    result: dict[str, Any] = {"status": None, "work_dir": str(work)}
    if not slices and not (cfg.retry_pending and state.get("pending")):
        msg = (f"no new logs since the last run ({len(files)} file(s) checked, "
               f"{len(state.get('pending', []))} pending slice(s) kept): nothing to do")
        say(msg)
        return {**result, "status": "no_new_logs", "message": msg}

    # 1. cut the new bytes into a batch and remember them as consumed (the batch itself is now the record)
    batch = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + f"-{len(state.get('runs', [])):04d}"
    written = write_slices(slices, work / "batches" / batch) if slices else []
    for s in slices:
        state["files"][s["path"]] = {"bytes": s["end"], "sha256": _prefix_sha(Path(s["path"]), s["end"])}
    pending = list(state.get("pending", [])) + written
    state["pending"] = pending
    save_state(work, state)
    new_bytes = sum(s["end"] - s["start"] for s in slices)
    say(f"{len(slices)} file(s) with new logs ({new_bytes} bytes); mining {len(pending)} slice(s)")
    result["batch"] = batch
    # Where the pending slices came from (for lineage: publish's README names the real log files).
    state.setdefault("sources", {}).update({w: s for w, s in zip(written, slices)})
    save_state(work, state)
    result["sources"] = [state["sources"][p] for p in pending if p in state["sources"]]

    # 2. mine
    from flywheel.pipelines.mine import MineConfig, run_mine

    mine_cfg = MineConfig.model_validate({**cfg.mine, **({"tracking_uri": cfg.tracking_uri}
                                                         if cfg.tracking_uri else {})})
    mined = run_mine(pending, work / "datasets" / batch, mine_cfg)
    kept = int(mined["counts"]["kept"])
    result["mine"] = {"run_id": mined["run_id"], "out": mined["out"], "version": mined["version"], "kept": kept}
    say(f"mined dataset {mined['version']}: {kept} kept records (run {mined['run_id']})")
    summary: dict[str, Any] = {"mine_run": mined["run_id"], "dataset_version": mined["version"]}
    if mined["run_id"]:  # the mine run saw only slices: name the real log files on it, for lineage
        from mlflow.tracking import MlflowClient

        tracking.setup(cfg.tracking_uri)
        MlflowClient().set_tag(mined["run_id"], "flywheel.loop.sources",
                               json.dumps(result["sources"])[:5000])

    if kept < cfg.min_new_records:
        msg = (f"{kept} new kept records < min_new_records={cfg.min_new_records}: not training; these logs stay "
               "pending and are mined again with the next ones")
        say(msg)
        result.update(status="skipped", message=msg)
        _summary_run(cfg, result, summary, new_bytes, kept)
        state.setdefault("runs", []).append({"batch": batch, "status": "skipped", "kept": kept})
        save_state(work, state)
        return result

    # 3. train
    from flywheel.pipelines.train import TrainConfig, run_train

    train_cfg = _stage_config(TrainConfig, cfg.train_config, cfg.train,
                              {"dataset": mined["out"], "output_dir": str(work / "train" / batch),
                               **({"tracking_uri": cfg.tracking_uri} if cfg.tracking_uri else {})})
    say(f"training {train_cfg.base_model} on {mined['out']} (max_steps={train_cfg.max_steps})")
    trained = run_train(train_cfg, progress=log is not None)  # a progress bar when someone is watching
    if not trained.get("adapter_dir"):
        raise InputError(f"training run {trained.get('run_id')} ended without an adapter")
    result["train"] = {"run_id": trained["run_id"], "adapter_dir": trained["adapter_dir"],
                       "final_loss": trained.get("final_loss")}
    summary["train_run"] = trained["run_id"]
    say(f"trained adapter {trained['adapter_dir']} (run {trained['run_id']})")

    # 4. gate (runs the eval) and promote
    from flywheel.pipelines.gate import GateConfig, run_gate

    gate_extra: dict[str, Any] = {"model_name": cfg.model_name, "out": str(work / "gate" / batch)}
    if cfg.eval_on_dataset and "cases" not in (cfg.gate.get("eval") or {}):
        gate_extra["eval"] = {"cases": mined["out"], "cache_dir": str(work / "cache" / "eval")}
    if cfg.tracking_uri:
        gate_extra["tracking_uri"] = cfg.tracking_uri
    gate_cfg = _stage_config(GateConfig, cfg.gate_config, cfg.gate, gate_extra)
    gated = run_gate(gate_cfg, f"runs:/{trained['run_id']}/adapter", promote=cfg.promote)
    result["gate"] = {k: gated[k] for k in ("decision", "exit_code", "run_id", "report_path",
                                              "promoted_version", "eval_run_id", "variant")}
    summary.update(gate_run=gated["run_id"], eval_run=gated["eval_run_id"])
    say(f"gate {gated['decision']} (exit {gated['exit_code']}): {gated['report_path']}")
    for r in gated["gate"]["reasons"][:5]:
        say(f"  - {r}")
    state["pending"] = []  # the data went into a candidate; a refused candidate is not retried on it
    state["sources"] = {}
    state.setdefault("runs", []).append({"batch": batch, "status": gated["decision"], "kept": kept,
                                         "train_run": trained["run_id"], "gate_run": gated["run_id"]})
    save_state(work, state)

    # 5. publish the new champion
    if gated["promoted_version"] and cfg.publish:
        from flywheel.pipelines.publish import PublishConfig, run_publish

        pub_cfg = PublishConfig.model_validate({**cfg.publish_config,
                                                **({"tracking_uri": cfg.tracking_uri} if cfg.tracking_uri else {})})
        out = cfg.publish_out or str(Path("Modelfiles") / cfg.model_name)
        pub = run_publish(f"models:/{cfg.model_name}@champion", out=out, cfg=pub_cfg)
        result["publish"] = {k: pub[k] for k in ("out", "modelfile", "run_id", "gguf_adapter", "ollama_create",
                                                  "warnings")}
        summary["publish_run"] = pub["run_id"]
        say(f"published {pub['modelfile']}")
        for w in pub["warnings"]:
            say(f"  warning: {w}")
        say(f"next: {pub['ollama_create']}")
    result.update(status=gated["decision"], message=f"gate {gated['decision']}")
    _summary_run(cfg, result, summary, new_bytes, kept)
    while mlflow.active_run():
        mlflow.end_run()
    return result


def _summary_run(cfg: LoopConfig, result: dict, inputs: dict, new_bytes: int, kept: int) -> None:
    from flywheel.pipelines import tracking

    with tracking.start_run("run", f"loop-{result.get('batch')}", inputs=inputs, configured_uri=cfg.tracking_uri,
                            tags={"flywheel.run.status": result["status"],
                                  "flywheel.loop.sources": json.dumps(result.get("sources", []))[:5000]},
                            params={"min_new_records": cfg.min_new_records, "model_name": cfg.model_name,
                                    "inputs": ",".join(cfg.inputs), "work_dir": cfg.work_dir}) as run:
        tracking.log_metrics({"new_bytes": new_bytes, "new_kept": kept})
        result["run_id"] = run.info.run_id


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. inputs=[logs/] min_new_records=50"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="configs/flywheel.yaml"),
    ) -> None:
        """The loop: mine new logs -> (enough?) train -> eval + gate -> promote + publish. For cron/CI."""
        from rich.console import Console

        console = Console()
        cfg = load_config(LoopConfig, config, overrides or [])
        res = run_loop(cfg, log=lambda m: console.print(f"[bold]flywheel run[/]: {m}", highlight=False))
        raise typer.Exit(res["gate"]["exit_code"] if res.get("gate") else 0)

    from flywheel.pipelines.registry import history_command

    history_command(app)
