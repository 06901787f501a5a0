"""`flywheel run`: the continuous fine-tuning loop as one command to schedule (cron, CI). And `flywheel history`.

    flywheel run --config configs/flywheel.yaml [key=value ...] [--retry]
    flywheel history [MODEL_NAME] [--json]

One pass:
0. **Check everything first.** Every section (`mine`, `train` on top of `train_config`, `gate` on top of
   `gate_config` including its `eval` suite, `publish_config`) is validated against its stage's config model,
   and the plan is checked: a batch of `min_new_records` kept records must give the gate at least `min_cases`
   eval cases (`min_new_records x mine.eval_fraction`, and `gate.eval.limit`). A typo is an error before any work.
1. **New logs only.** For each input log file, `work_dir/state.json` remembers how many bytes were cut into a
   batch and the hash of that prefix. Appended lines (complete lines only: a line being written stays for next
   time) are new; a file whose prefix changed was rewritten and counts as new in full. No new bytes and nothing
   to retry: nothing is run or logged, and the command says so.
   An input `mlflow-traces:<experiment>` is read from the tracking store instead: per experiment the state keeps
   the consumed watermark (the newest trace time of the last batch a gate decided on) and the newest trace time
   mined so far. Each batch mines the traces newer than the consumed watermark (those of an undecided batch are
   mined again, like pending slices); a trace newer than anything mined so far counts as new logs.
2. **Mine** the new slices plus any still-pending ones (`flywheel.pipelines.mine.run_mine`).
3. **Threshold.** Fewer new kept records than `min_new_records`, or fewer eval records than the gate's
   `min_cases`: no training. The slices stay pending and are mined again together with the next logs.
4. **Train** on the mined dataset (`flywheel.pipelines.train.run_train`), **gate** the adapter against the champion
   (`flywheel.pipelines.gate.run_gate`, which runs the eval), and on a pass **promote** and **publish** the new
   champion (`flywheel.pipelines.publish.run_publish`).
5. A summary run in `flywheel/run` ties the stage runs together (tags `flywheel.input.<stage>_run`).

Pending slices are consumed only by a gate *decision* (pass or fail). A gate error (exit 2) decided nothing: the
slices stay pending, the command says so, and `flywheel run --retry` (or the next run with new logs) mines them
again. Training is on the new data only (fresh LoRA from the base): the gate then asks whether it beats the champion.
Exit code of `flywheel run`: the gate's (0 pass, 1 fail, 2 error); 0 when there was nothing to do or too little.

Python entry: `run_loop(cfg, log=None) -> {status, message, ...stage results}`; status is one of
`no_new_logs`, `skipped`, `pass`, `fail`, `error`. `demo_loop_config(logs, work_dir, **overrides)` builds the
config `flywheel demo` uses.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from pydantic import Field

from flywheel.pipelines.config import StageConfig, load_config
from flywheel.foundation.errors import FlywheelError, InputError
from flywheel.foundation.io import read_json
from flywheel.pipelines import tags as T

from flywheel.mining.slices import expand_inputs, new_slices, prefix_sha as _prefix_sha, write_slices  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
INDEX_FILE = "dedupe-index.npz"  # exact keys + MinHash signatures of what consumed batches kept


class LoopConfig(StageConfig):
    inputs: list[str] = Field(default_factory=list, description="Log files or folders of them (append-only JSONL; "
                              "CSV/Parquet count as new when they change), and `mlflow-traces:<experiment>` "
                              "(the traces newer than the last consumed batch's newest).")
    work_dir: Optional[str] = Field(None, description="state.json, batches/, datasets/, train/, gate/; default "
                                    "<FLYWHEEL_HOME>/loop.")
    min_new_records: int = Field(150, ge=0, description="Fewer new kept records than this: no training; the "
                                 "slices stay pending and are mined again with the next logs.")
    model_name: str = Field("flywheel", description="Registered model; its @champion is the baseline.")
    mine: dict[str, Any] = Field(default_factory=dict, description="MineConfig keys (configs/mine.yaml).")
    train_config: Optional[str] = Field("configs/train/smollm2-lora.yaml", description="Train config file; the "
                                        "`train` keys go on top.")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig keys on top of train_config "
                                  "(max_steps, ...).")
    gate_config: Optional[str] = Field("configs/gate.yaml", description="Gate config file; the `gate` keys go "
                                       "on top.")
    gate: dict[str, Any] = Field(default_factory=dict, description="GateConfig keys on top of gate_config "
                                 "(min_cases, eval: {...}).")
    eval_on_dataset: bool = Field(True, description="Gate on the mined eval split unless gate.eval.cases is set.")
    retry_pending: bool = Field(False, description="Mine the pending slices again even with no new logs "
                                "(`flywheel run --retry`, after a gate error).")
    promote: bool = Field(True, description="On a gate pass: register the adapter and move @champion.")
    publish: bool = Field(True, description="On a promotion: write the Ollama Modelfile folder.")
    publish_out: Optional[str] = Field(None, description="Publish folder; default Modelfiles/<model_name>.")
    publish_config: dict[str, Any] = Field(default_factory=dict, description="PublishConfig keys.")
    tracking_uri: Optional[str] = Field(None, description="MLflow store; default the embedded one in "
                                        "FLYWHEEL_HOME (MLFLOW_TRACKING_URI wins).")


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


# -- new logs (the slicing itself is the mining core's: flywheel.mining.slices) ---------------------------------

def load_state(work: Path) -> dict:
    p = work / "state.json"
    if not p.exists():
        return {"files": {}, "pending": [], "runs": []}
    try:
        return read_json(p)
    except InputError as e:
        raise InputError(f"{e}; fix or delete it to re-mine everything") from None


def load_index(work: Path):
    """The dedupe index of every consumed batch (`flywheel.mining.dedupe.DedupeIndex`), None before the first."""
    from flywheel.mining.dedupe import DedupeIndex

    p = work / INDEX_FILE
    return DedupeIndex.load(p) if p.exists() else None


def save_state(work: Path, state: dict) -> None:
    from flywheel.foundation.io import write_json

    write_json(work / "state.json", state)


# -- the loop -------------------------------------------------------------------------------------------------

def _resolve(path: str | None) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    return p if p.exists() or p.is_absolute() else (ROOT / p if (ROOT / p).exists() else p)


def work_dir(cfg: LoopConfig) -> Path:
    from flywheel.pipelines import tracking

    return Path(cfg.work_dir).resolve() if cfg.work_dir else tracking.flywheel_home() / "loop"


def _stage_config(model, section_name: str, path: str | None, section: dict, extra: dict):
    """`path` <- the loop's `section` <- `extra`, validated; errors name the loop section they came from."""
    from flywheel.foundation.config import ConfigError
    from flywheel.pipelines.config import _deep_merge, read_yaml

    data = read_yaml(_resolve(path)) if path else {}
    data = _deep_merge(_deep_merge(data, section), extra)
    try:
        return load_config(model, None, [], base=data)
    except ConfigError as e:
        where = f"{section_name}" + (f" (on top of {path})" if path else "")
        raise ConfigError(f"loop config, section {where}: {e}") from None


def _uri(cfg: LoopConfig) -> dict:
    return {"tracking_uri": cfg.tracking_uri} if cfg.tracking_uri else {}


def stage_configs(cfg: LoopConfig, work: Path, batch: str, dataset: str | Path) -> dict[str, Any]:
    """Every stage's config for one batch, validated: {mine, train, gate, eval, publish}.

    Called once before any work (with the batch's future paths), so a typo under `train.` or `gate.` stops the
    run at once instead of after mining or a full training run; and again with the real dataset."""
    from flywheel.evals.gate import GateConfig
    from flywheel.pipelines.gate import _eval_config
    from flywheel.pipelines.mine import MineConfig
    from flywheel.pipelines.publish import PublishConfig
    from flywheel.pipelines.train import TrainConfig

    mine = _stage_config(MineConfig, "mine", None, cfg.mine, _uri(cfg))
    train = _stage_config(TrainConfig, "train", cfg.train_config, cfg.train,
                          {"dataset": str(dataset), "output_dir": str(work / "train" / batch), **_uri(cfg)})
    gate_extra: dict[str, Any] = {"model_name": cfg.model_name, "out": str(work / "gate" / batch), **_uri(cfg)}
    if cfg.eval_on_dataset and "cases" not in (cfg.gate.get("eval") or {}):
        gate_extra["eval"] = {"cases": str(dataset), "cache_dir": str(work / "cache" / "eval")}
    gate = _stage_config(GateConfig, "gate", cfg.gate_config, cfg.gate, gate_extra)
    try:  # the eval suite the gate will run, with placeholder targets: its keys are checked now too
        evalc = _eval_config(gate, {"name": "base", "base": train.base_model}, "candidate", work / "gate" / batch)
    except FlywheelError as e:
        raise type(e)(f"loop config, section gate.eval: {e}") from None
    publish = _stage_config(PublishConfig, "publish_config", None, cfg.publish_config, _uri(cfg))
    return {"mine": mine, "train": train, "gate": gate, "eval": evalc, "publish": publish}


def check_plan(cfg: LoopConfig, plan: dict[str, Any]) -> None:
    """A batch the threshold lets through must be able to reach a gate decision: refuse settings that train
    for many minutes and then error on too few eval cases."""
    gate, evalc = plan["gate"], plan["eval"]
    if evalc.limit is not None and evalc.limit < gate.min_cases:
        raise InputError(f"loop config: the gate evaluates at most gate.eval.limit={evalc.limit} cases but needs "
                         f"gate.min_cases={gate.min_cases}: every gate would error; raise the limit or lower "
                         "min_cases")
    if not (cfg.eval_on_dataset and "cases" not in (cfg.gate.get("eval") or {})):
        return
    frac = plan["mine"].eval_fraction
    expected = cfg.min_new_records * frac
    if expected < gate.min_cases:
        need = math.ceil(gate.min_cases / frac) if frac > 0 else None
        raise InputError(
            f"loop config: a batch of min_new_records={cfg.min_new_records} kept records gives ~{expected:g} eval "
            f"cases (mine.eval_fraction={frac:g}) but the gate needs gate.min_cases={gate.min_cases}: such a batch "
            f"would train and then error; set min_new_records>={need} or raise mine.eval_fraction or lower "
            "gate.min_cases" if need else
            f"loop config: mine.eval_fraction=0 leaves no eval split for the gate (gate.min_cases="
            f"{gate.min_cases}); set mine.eval_fraction or gate.eval.cases")


# -- traces: per experiment, what was consumed and what was mined --------------------------------------------

def _split_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """(log files, `mlflow-traces:<experiment>` sources) named by the loop's inputs."""
    from flywheel.pipelines.traces import is_source

    srcs = [x for x in inputs if is_source(x)]
    paths = [x for x in inputs if not is_source(x)]
    return (expand_inputs(paths) if paths or not srcs else []), srcs


def _marks(state: dict, source: str) -> dict:
    """{consumed_ms, mined_ms} of a trace source: newest trace of the last decided batch / of any mined batch."""
    return state.setdefault("traces", {}).setdefault(source, {"consumed_ms": None, "mined_ms": None})


def _pending_traces(state: dict, sources: list[str]) -> list[str]:
    """Sources with traces mined into a batch that no gate decided on yet."""
    return [s for s in sources if (_marks(state, s)["mined_ms"] or 0) > (_marks(state, s)["consumed_ms"] or 0)]


def _new_traces(mine_cfg, state: dict, sources: list[str]) -> list[str]:
    from flywheel.pipelines.traces import has_new

    return [s for s in sources if has_new(s, mine_cfg, _marks(state, s)["mined_ms"])]


def _mark_traces(state: dict, manifest: dict, key: str) -> None:
    """Move a watermark (`mined_ms` after mining, `consumed_ms` after a decision) to the batch's newest trace."""
    for inp in manifest["inputs"]:
        newest = inp.get("newest_trace_ms")
        if inp["path"] in state.get("traces", {}) and newest is not None:
            marks = _marks(state, inp["path"])
            marks[key] = max(newest, marks[key] or newest)


def _nothing_to_do(cfg: LoopConfig, files: list[Path], state: dict, sources: list[str] = ()) -> str:
    pending = state.get("pending", []) + _pending_traces(state, list(sources))
    last = (state.get("runs") or [{}])[-1]
    checked = f"{len(files)} file(s)" + (f" and {len(sources)} trace experiment(s)" if sources else "")
    msg = f"no new logs since the last run ({checked} checked, {len(pending)} pending slice(s) kept)"
    if pending and last.get("status") == "error":
        return (f"{msg}; the last run ({last.get('batch')}) ended in a gate error and kept its slices: "
                "`flywheel run --retry` tries them again now, or they go with the next logs")
    return f"{msg}: nothing to do"


def run_loop(cfg: LoopConfig, log: Callable[[str], None] | None = None) -> dict:
    """One pass of the loop. Returns {status, message, batch, mine, train, gate, publish, run_id}."""
    import mlflow

    say = log or (lambda msg: None)
    work = work_dir(cfg)
    batch = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    # 0. every section validated and the plan checked before anything is read, mined or trained
    plan = stage_configs(cfg, work, batch, work / "datasets" / batch)
    check_plan(cfg, plan)
    work.mkdir(parents=True, exist_ok=True)
    state = load_state(work)
    files, sources = _split_inputs(cfg.inputs)
    slices = new_slices(files, state)
    new_traces = _new_traces(plan["mine"], state, sources)
    result: dict[str, Any] = {"status": None, "work_dir": str(work)}
    pending = state.get("pending") or _pending_traces(state, sources)
    if not slices and not new_traces and not (cfg.retry_pending and pending):
        msg = _nothing_to_do(cfg, files, state, sources)
        say(msg)
        return {**result, "status": "no_new_logs", "message": msg}
    publish_out = _publish_out(cfg)

    # 1. cut the new bytes into a batch; they stay pending until a gate reaches a decision on them
    batch += f"-{len(state.get('runs', [])):04d}"
    new_bytes = _cut_batch(work, state, slices, batch, result, say)
    # 2. mine
    plan = stage_configs(cfg, work, batch, work / "datasets" / batch)
    mined, summary = _mine(cfg, plan["mine"], work, batch, state, sources, result, say)
    kept = result["mine"]["kept"]
    short = _too_little(cfg, plan, kept, result["mine"]["eval"])
    if short:
        return _skip(cfg, work, state, batch, short, result, summary, new_bytes, say)

    # 3. train, 4. gate (runs the eval) and promote
    plan = stage_configs(cfg, work, batch, mined["out"])
    trained = _train(plan["train"], mined["out"], result, summary, log)
    gated = _gate(cfg, plan["gate"], trained["run_id"], result, summary, say)
    decided = _record_gate(state, batch, kept, trained["run_id"], gated, say)
    if decided:  # the traces of this batch are consumed with its slices
        _mark_traces(state, mined["manifest"], "consumed_ms")
    save_state(work, state)
    if decided:
        # Only once the slices are consumed (pending ones are mined again and must not match themselves); after the
        # state, so a crash in between lets duplicates through rather than dropping unconsumed data.
        mined["index"].save(work / INDEX_FILE)

    # 5. publish the new champion
    if gated["promoted_version"] and cfg.publish:
        result["publish"] = _publish(cfg, plan["publish"], publish_out, summary, say)
    result.update(status=gated["decision"], message=f"gate {gated['decision']}")
    _summary_run(cfg, result, summary, new_bytes, kept)
    while mlflow.active_run():
        mlflow.end_run()
    return result


def _publish_out(cfg: LoopConfig) -> str:
    """The publish folder; one Flywheel may not replace stops the loop now, not after training."""
    publish_out = cfg.publish_out or str(Path("Modelfiles") / cfg.model_name)
    if cfg.publish:
        from flywheel.foundation.io import check_output_dir

        check_output_dir(publish_out, force=bool(cfg.publish_config.get("force", False)))
    return publish_out


def _skip(cfg: LoopConfig, work: Path, state: dict, batch: str, why: str, result: dict, summary: dict,
          new_bytes: int, say) -> dict:
    """Too little data to train on: the batch stays pending (its slices and traces are mined again next time)."""
    say(why)
    result.update(status="skipped", message=why)
    _summary_run(cfg, result, summary, new_bytes, result["mine"]["kept"])
    state.setdefault("runs", []).append({"batch": batch, "status": "skipped", "kept": result["mine"]["kept"]})
    save_state(work, state)
    return result


def _cut_batch(work: Path, state: dict, slices: list[dict], batch: str, result: dict, say) -> int:
    """Copy the new slices into `batches/<batch>`, add them to the pending ones; returns the new bytes."""
    written = write_slices(slices, work / "batches" / batch) if slices else []
    for s in slices:
        state["files"][s["path"]] = {"bytes": s["end"], "sha256": _prefix_sha(Path(s["path"]), s["end"])}
    pending = list(state.get("pending", [])) + written
    state["pending"] = pending
    # Where the pending slices came from (for lineage: publish's README names the real log files).
    state.setdefault("sources", {}).update({w: s for w, s in zip(written, slices)})
    save_state(work, state)
    new_bytes = sum(s["end"] - s["start"] for s in slices)
    if pending:  # a loop on traces alone has no files to talk about
        say(f"{len(slices)} file(s) with new logs ({new_bytes} bytes); mining {len(pending)} slice(s)"
            + (f" ({len(pending) - len(written)} pending from earlier runs)" if len(pending) > len(written) else ""))
    result["batch"] = batch
    result["sources"] = [state["sources"][p] for p in pending if p in state["sources"]]
    return new_bytes


def _mine(cfg: LoopConfig, mine_cfg, work: Path, batch: str, state: dict, sources: list[str], result: dict,
          say) -> tuple[dict, dict]:
    from flywheel.pipelines import tracking
    from flywheel.pipelines.mine import run_mine
    from flywheel.pipelines.traces import resolve_inputs

    # The traces newer than the last decided batch's: those of an undecided batch are mined again.
    since = {s: _marks(state, s)["consumed_ms"] for s in sources}
    for s in sources:
        say(f"{s}: mining the traces " + (f"newer than {since[s]} ms" if since[s] is not None else "(all)"))
    inputs = resolve_inputs(list(state["pending"]) + sources, mine_cfg, since)
    # What earlier, consumed batches kept: a conversation seen there is dropped as `duplicate_earlier_batch`.
    mined = run_mine(inputs, work / "datasets" / batch, mine_cfg, prior_index=load_index(work))
    _mark_traces(state, mined["manifest"], "mined_ms")
    save_state(work, state)
    # Lineage names the trace windows beside the file slices: which traces of which experiment were mined.
    result["sources"] = result.get("sources", []) + [
        {"traces": i["path"], "after_ms": since.get(i["path"]), "newest_ms": i.get("newest_trace_ms")}
        for i in mined["manifest"]["inputs"] if i["path"] in since]
    kept = int(mined["counts"]["kept"])
    n_eval = int((mined.get("splits") or {}).get("eval", 0))
    result["mine"] = {"run_id": mined["run_id"], "out": mined["out"], "version": mined["version"], "kept": kept,
                      "eval": n_eval}
    say(f"mined dataset {mined['version']}: {kept} kept records, {n_eval} for eval (run {mined['run_id']})")
    if mined["run_id"]:  # the mine run saw only slices: name the real log files on it, for lineage
        from mlflow.tracking import MlflowClient

        tracking.setup(cfg.tracking_uri)
        MlflowClient().set_tag(mined["run_id"], T.LOOP_SOURCES,
                               json.dumps(result["sources"])[:5000])
    return mined, {T.IN_MINE_RUN: mined["run_id"], T.IN_DATASET_VERSION: mined["version"]}


def _train(train_cfg, dataset: str, result: dict, summary: dict, log) -> dict:
    from flywheel.pipelines.train import run_train

    say = log or (lambda msg: None)
    say(f"training {train_cfg.base_model} on {dataset} (max_steps={train_cfg.max_steps})")
    trained = run_train(train_cfg, progress=log is not None)  # a progress bar when someone is watching
    if not trained.get("adapter_dir"):
        raise InputError(f"training run {trained.get('run_id')} ended without an adapter")
    result["train"] = {"run_id": trained["run_id"], "adapter_dir": trained["adapter_dir"],
                       "final_loss": trained.get("final_loss")}
    summary[T.IN_TRAIN_RUN] = trained["run_id"]
    say(f"trained adapter {trained['adapter_dir']} (run {trained['run_id']})")
    return trained


def _gate(cfg: LoopConfig, gate_cfg, train_run: str, result: dict, summary: dict, say) -> dict:
    from flywheel.pipelines.gate import run_gate

    gated = run_gate(gate_cfg, f"runs:/{train_run}/adapter", promote=cfg.promote)
    result["gate"] = {k: gated[k] for k in ("decision", "exit_code", "run_id", "report_path",
                                              "promoted_version", "eval_run_id", "variant")}
    summary.update({T.IN_GATE_RUN: gated["run_id"], T.IN_EVAL_RUN: gated["eval_run_id"]})
    say(f"gate {gated['decision']} (exit {gated['exit_code']}): {gated['report_path']}")
    for r in gated["gate"]["reasons"][:5]:
        say(f"  - {r}")
    return gated


def _too_little(cfg: LoopConfig, plan: dict[str, Any], kept: int, n_eval: int) -> str | None:
    """Why this batch is not trained yet (its slices stay pending), or None."""
    keep = "not training; these logs stay pending and are mined again with the next ones"
    if kept < cfg.min_new_records:
        return f"{kept} new kept records < min_new_records={cfg.min_new_records}: {keep}"
    if cfg.eval_on_dataset and "cases" not in (cfg.gate.get("eval") or {}):
        usable = min(n_eval, plan["eval"].limit or n_eval)
        if usable < plan["gate"].min_cases:
            return (f"{n_eval} eval records in this batch (eval_fraction={plan['mine'].eval_fraction:g}) < "
                    f"gate.min_cases={plan['gate'].min_cases}: the gate could not decide; {keep}")
    return None


def _record_gate(state: dict, batch: str, kept: int, train_run: str, gated: dict, say) -> bool:
    """A decision (pass or fail) consumes the pending slices: the data went into a judged candidate, and a
    refused one is not retried on it. An error decided nothing: the slices stay pending for a retry.
    Returns whether the slices were consumed."""
    entry = {"batch": batch, "status": gated["decision"], "kept": kept, "train_run": train_run,
             "gate_run": gated["run_id"]}
    if gated["exit_code"] == 2:
        say(f"gate error: the {len(state['pending'])} pending slice(s) are kept; `flywheel run --retry` tries "
            "them again now, or they go with the next logs")
    else:
        state["pending"] = []
        state["sources"] = {}
    state.setdefault("runs", []).append(entry)
    return gated["exit_code"] != 2


def _publish(cfg: LoopConfig, pub_cfg, out: str, summary: dict, say) -> dict:
    from flywheel.pipelines.publish import run_publish

    pub = run_publish(f"models:/{cfg.model_name}@champion", out=out, cfg=pub_cfg)
    summary[T.IN_PUBLISH_RUN] = pub["run_id"]
    say(f"published {pub['modelfile']}")
    for w in pub["warnings"]:
        say(f"  warning: {w}")
    say(f"next: {pub['ollama_create']}")
    return {k: pub[k] for k in ("out", "modelfile", "run_id", "gguf_adapter", "ollama_create", "warnings")}


def _summary_run(cfg: LoopConfig, result: dict, inputs: dict, new_bytes: int, kept: int) -> None:
    from flywheel.pipelines import tracking

    with tracking.start_run("run", f"loop-{result.get('batch')}", inputs=inputs, configured_uri=cfg.tracking_uri,
                            tags={T.RUN_STATUS: result["status"],
                                  T.LOOP_SOURCES: json.dumps(result.get("sources", []))[:5000]},
                            params={"min_new_records": cfg.min_new_records, "model_name": cfg.model_name,
                                    "inputs": ",".join(cfg.inputs), "work_dir": result["work_dir"]}) as run:
        tracking.log_metrics({"new_bytes": new_bytes, "new_kept": kept})
        result["run_id"] = run.info.run_id


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. inputs=[logs/] min_new_records=50"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="configs/flywheel.yaml"),
        retry: bool = typer.Option(False, "--retry", help="Mine the pending slices again even with no new logs "
                                   "(after a gate error); same as retry_pending=true."),
    ) -> None:
        """The loop: mine new logs -> (enough?) train -> eval + gate -> promote + publish. For cron/CI.
        Exit code: the gate's (0 pass, 1 fail, 2 error); 0 when there was nothing or too little to do."""
        from rich.console import Console

        console = Console()
        cfg = load_config(LoopConfig, config, (overrides or []) + (["retry_pending=true"] if retry else []))
        res = run_loop(cfg, log=lambda m: console.print(f"[bold]flywheel run[/]: {m}", highlight=False))
        raise typer.Exit(res["gate"]["exit_code"] if res.get("gate") else 0)

    from flywheel.pipelines.registry import history_command

    history_command(app)
