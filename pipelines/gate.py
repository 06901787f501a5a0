"""`flywheel gate`: may the candidate adapter replace the champion? An exit code CI can trust.

    flywheel gate --candidate RUN_OR_MODEL_URI [--config configs/gate.yaml] [--promote] [key=value ...]
    flywheel gate --results out/results.json --candidate NAME ...   # re-apply the rules to an existing eval

Recipe:
1. Resolve the candidate (train run id, `runs:/…`, `models:/…`, adapter dir) and the baseline: the registry's
   `models:/<model_name>@champion`, or the candidate's own base model when there is no champion yet.
   An unreadable champion is an error, never "no champion" (that would let anything through).
2. Run `flywheel eval` (`flywheel.pipelines.eval.run_eval`) with both as targets over the same cases, so every
   comparison is paired. By default only the metrics the rules read are computed.
3. Apply the rules (`flywheel.evals.gate.evaluate`: MetricThreshold change + corrected significance on the primary
   metric, non-inferiority on guardrails, min cases, optional `flywheel ab` verdict). Anything missing,
   NaN or crashed is `error`.
4. Write `gate.json` and `gate_report.md` (a PR comment), log a `flywheel/gate` run (tag
   `flywheel.gate.decision`), and with `--promote` on a pass register the adapter and move `champion`.
Exit 0 pass, 1 fail, 2 error.

Python entry: `run_gate(cfg, candidate, promote=False) -> {decision, exit_code, run_id, report_path, gate_path,
gate, promoted_version, eval_run_id, variant, system_prompt}`.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Optional

import typer

from flywheel.evals.gate import (TEACHER_FORCED, Evidence, GateConfig, candidate_dataset, default_baseline_target,
                                 shipped_variant)
from flywheel.evals.prompts.suite import check_enough_cases
from flywheel.pipelines.config import load_config
from flywheel.foundation.errors import FlywheelError, InputError
from flywheel.foundation.io import read_json
from flywheel.pipelines import tags as T

ROOT = Path(__file__).resolve().parents[1]
CANDIDATE_CASES = "candidate"  # eval.cases: the eval split of the candidate's own training dataset


# -- helpers --------------------------------------------------------------------------------------------------

def _eval_config(cfg: GateConfig, baseline: dict, candidate_uri: str, out: Path):
    """The eval suite from `eval_config` + `eval`, with the two targets the gate compares."""
    from flywheel.pipelines.config import _deep_merge, read_yaml
    from flywheel.evals.prompts.config import EvalConfig

    path = Path(cfg.eval_config)
    if not path.exists() and (ROOT / path).exists():
        path = ROOT / path
    data = _deep_merge(read_yaml(path), cfg.eval)
    data.update(name="gate", out=str(out / "eval"), targets=[baseline], candidate=candidate_uri,
                primary_metric=cfg.primary.metric)
    if cfg.variant:
        data["variants"] = [cfg.variant]
    if cfg.restrict_metrics:
        data["metrics"] = list(dict.fromkeys([cfg.primary.metric] + [g.metric for g in cfg.guardrails]))
        if set(data["metrics"]) <= TEACHER_FORCED and "max_new_tokens" not in (cfg.eval.get("generation") or {}):
            # The eval harness always generates; a rule set that reads only teacher-forced metrics does not
            # need the text, so one token keeps the gate to the cost of the NLL pass.
            data["generation"] = {**(data.get("generation") or {}), "max_new_tokens": 1}
    if cfg.tracking_uri:
        data.setdefault("tracking_uri", cfg.tracking_uri)
    try:
        return EvalConfig.model_validate(data)
    except Exception as e:
        from pydantic import ValidationError

        from flywheel.pipelines.config import ConfigError, format_validation_error

        if isinstance(e, ValidationError):
            raise ConfigError(format_validation_error(e, f"{path} + gate eval overrides")) from None
        raise


def _candidate_cases(cand) -> str:
    """`eval.cases: candidate`: the held-out eval split of the dataset the candidate was trained on, found through
    its lineage (mine run -> `flywheel.dataset_path`), and only while that directory still holds that version."""
    from mlflow.tracking import MlflowClient

    from flywheel.pipelines.train import _mine_run_for_version

    meta = cand.meta
    run = None
    if meta.get("mine_run_id"):
        try:
            run = MlflowClient().get_run(meta["mine_run_id"])
        except Exception:  # noqa: BLE001 - a deleted run: fall back to the version lookup
            run = None
    if run is None and meta.get("dataset_version"):
        run = _mine_run_for_version(meta["dataset_version"], None)
    return candidate_dataset(run.data.tags.get(T.DATASET_PATH) if run is not None else None, meta, cand.label)


def _sample_generations(cfg: GateConfig, ecfg, eval_run_id: str, out: Path, show_progress: bool) -> str | None:
    """When the gate's eval generated too little to read (NLL only: one token), evaluate the first
    `sample_generations.n_cases` cases again with real generations: an eval run of its own (`gate-sample`),
    linked both ways by tags (`flywheel.eval.sample_run` / `flywheel.eval.sample_of`). It never decides
    anything; a failure is a warning, not a gate error."""
    s = cfg.sample_generations
    if s.n_cases == 0 or ecfg.generation.max_new_tokens >= s.max_new_tokens:
        return None
    import mlflow
    from mlflow.tracking import MlflowClient

    from flywheel.evals.prompts.config import EvalConfig
    from flywheel.pipelines.eval import run_eval

    data = ecfg.model_dump()
    data.update(name="gate-sample", run_name="gate-sample", out=str(out), limit=min(ecfg.limit or s.n_cases,
                                                                                     s.n_cases))
    data["generation"]["max_new_tokens"] = s.max_new_tokens
    try:
        res = run_eval(EvalConfig.model_validate(data), show_progress=show_progress)
    except Exception as e:  # display only: the decision does not depend on it
        typer.secho(f"warning: sample generations failed ({type(e).__name__}: {e})", fg=typer.colors.YELLOW,
                    err=True)
        while mlflow.active_run():
            mlflow.end_run(status="FAILED")
        return None
    try:
        client = MlflowClient()
        client.set_tag(eval_run_id, T.EVAL_SAMPLE_RUN, res["run_id"])
        client.set_tag(res["run_id"], T.EVAL_SAMPLE_OF, eval_run_id)
    except Exception as e:  # noqa: BLE001 - display only: a missing link never changes the decision
        typer.secho(f"warning: could not link the sample run ({type(e).__name__}: {e})", fg=typer.colors.YELLOW,
                    err=True)
    return res["run_id"]


def latest_ab_verdict(variant: str | None, max_age_hours: float) -> str | None:
    import time

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("flywheel/ab")
    if exp is None:
        return None
    since = int((time.time() - max_age_hours * 3600) * 1000)
    runs = client.search_runs([exp.experiment_id], f"attributes.start_time > {since}",
                              order_by=["attributes.start_time DESC"], max_results=20)
    prefix = T.ab_verdict_tag("")
    for r in runs:
        if variant is None:  # the latest analysis decides which variant, when it has a single treatment
            found = {k[len(prefix):]: v for k, v in r.data.tags.items() if k.startswith(prefix)}
            if len(found) > 1:
                raise InputError(f"ab.require: the latest `flywheel ab` run has verdicts for {sorted(found)}; "
                                 "set ab.variant to the one that ships")
            if found:
                return next(iter(found.values()))
            continue
        v = r.data.tags.get(T.ab_verdict_tag(variant))
        if v:
            return v
    return None


def _looks_like_model(ref: str) -> bool:
    from flywheel.pipelines.registry import RUN_ID

    return ref.startswith(("runs:/", "models:/")) or bool(RUN_ID.match(ref)) or Path(ref).is_dir()


def _check_results_identity(cfg: GateConfig, results: dict, cand) -> tuple[str | None, str]:
    """Before promoting on an existing results.json: it must be an evaluation of exactly this candidate against
    exactly the current champion (or the base model when there is none). -> (champion version, baseline label);
    InputError (one line) otherwise."""
    from flywheel.evals.gate import check_identities
    from flywheel.evals.prompts.generate import load_adapter
    from flywheel.pipelines import registry

    if cand is None:
        raise InputError("--promote with --results needs the candidate as a model reference (run id, runs:/…, "
                         "models:/…, adapter dir) to check it against the results")
    champ = registry.champion(cfg.model_name)
    champ_version, champ_sha = None, None
    label = "no champion yet"
    if champ is not None:
        champ_version = str(champ.version)
        cm = registry.resolve_model(f"models:/{cfg.model_name}/{champ_version}", "champion")
        champ_sha = load_adapter(cm.adapter_dir).sha256
        label = f"models:/{cfg.model_name}@champion (v{champ_version})"
    baseline = cfg.baseline_target or default_baseline_target(results, cfg.candidate_target)
    problems = check_identities(results, baseline=baseline, candidate=cfg.candidate_target,
                                candidate_sha256=load_adapter(cand.adapter_dir).sha256, champion_sha256=champ_sha,
                                champion_label=label if champ is not None else "no champion")
    if problems:
        raise InputError(f"{cfg.results}: not evidence for this promotion: " + "; ".join(problems))
    return champ_version, label


# -- the stage ------------------------------------------------------------------------------------------------

def _regate_results(cfg: GateConfig, candidate: str, promote: bool, ev: Evidence) -> None:
    """Re-gating an existing evaluation: the targets are named in the file."""
    from flywheel.pipelines import registry

    rp = Path(cfg.results)
    if not rp.exists():
        raise InputError(f"results {rp}: no such file")
    ev.results = read_json(rp)
    ev.eval_run_id = ev.results.get("run_id")
    ev.baseline_target = cfg.baseline_target or default_baseline_target(ev.results, ev.candidate_target)
    ev.baseline_label = ev.baseline_target
    if _looks_like_model(candidate):  # then --promote can register it
        ev.cand = registry.resolve_model(candidate, "candidate")
        ev.candidate_label = ev.cand.label
    if promote:
        ev.champ_version, ev.baseline_label = _check_results_identity(cfg, ev.results, ev.cand)


def _baseline(cfg: GateConfig, cand, ev: Evidence) -> dict:
    """The eval target to beat: the champion (read now: one whose files are gone must stop the gate, not be
    skipped), else the base model."""
    from flywheel.pipelines import registry

    champ = registry.champion(cfg.model_name)
    if champ is not None:
        ev.champ_version = str(champ.version)
        registry.resolve_model(f"models:/{cfg.model_name}/{ev.champ_version}", "champion")
        ev.baseline_label = f"models:/{cfg.model_name}@champion (v{ev.champ_version})"
        return {"name": "champion", "adapter": f"models:/{cfg.model_name}/{ev.champ_version}"}
    base = cfg.base_model or cand.meta.get("base_model") or "smollm2-135m-instruct"
    ev.baseline_label = f"base model {base} (no champion yet)"
    return {"name": "base", "base": base}


def _evaluate_candidate(cfg: GateConfig, candidate: str, ev: Evidence, staging: Path, show_progress: bool) -> None:
    """Candidate and baseline through `flywheel eval` on the same cases (plus the display-only sample)."""
    from flywheel.pipelines import registry
    from flywheel.pipelines.eval import run_eval

    cand = ev.cand = registry.resolve_model(candidate, "candidate")
    ev.candidate_label = cand.label
    baseline = _baseline(cfg, cand, ev)
    ev.baseline_target, ev.candidate_target = baseline["name"], "candidate"
    ecfg = _eval_config(cfg, baseline, cand.uri if cand.uri.startswith(("runs:/", "models:/"))
                        else str(cand.adapter_dir), staging)
    if ecfg.cases == CANDIDATE_CASES:
        ecfg.cases = _candidate_cases(cand)
    check_enough_cases(ecfg, cfg.min_cases)  # seconds, not the minutes of an eval doomed to `error`
    res = run_eval(ecfg, show_progress=show_progress)
    ev.results, ev.eval_run_id = res["results"], res["run_id"]
    ev.sample_run_id = _sample_generations(cfg, ecfg, ev.eval_run_id, staging / "sample", show_progress)


def _gather_evidence(cfg: GateConfig, candidate: str, promote: bool, staging: Path, show_progress: bool) -> Evidence:
    """Phase 1, the evidence, before the gate run opens (the eval stage logs its own run in flywheel/prompts).
    Never raises for a bad candidate/champion/eval: the problem is recorded for an `error` decision."""
    import mlflow

    ev = Evidence(candidate_label=candidate, baseline_target=cfg.baseline_target,
                   candidate_target=cfg.candidate_target)
    try:
        if cfg.results:
            _regate_results(cfg, candidate, promote, ev)
        else:
            _evaluate_candidate(cfg, candidate, ev, staging, show_progress)
    except FlywheelError as e:
        ev.problems.append(str(e))
    except Exception as e:  # a crashed evaluation is an error decision, with the cause in the report
        ev.problems.append(f"evaluation crashed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        traceback.print_exc()
    finally:
        while mlflow.active_run():  # a crash inside eval may leave its run open
            mlflow.end_run(status="FAILED")
    return ev


def _promote(cfg: GateConfig, gate: dict, ev: Evidence, run_id: str, variant: str | None,
             system_prompt: str | None) -> str | None:
    """On a pass with --promote: register and move @champion, only if it is still what was evaluated against
    (compare-and-set); a moved champion turns the decision into `error`. -> the new version or None."""
    import mlflow

    from flywheel.evals import gate as rules_mod
    from flywheel.pipelines import registry

    if gate["decision"] != rules_mod.PASS:
        return None
    if ev.cand is None:
        gate["reasons"].append("--promote needs a candidate model reference (run id, runs:/, dir)")
        return None
    tags = {T.input_tag(T.IN_EVAL_RUN): ev.eval_run_id, T.input_tag(T.IN_GATE_RUN): run_id,
            T.PROMPT_VARIANT: variant,
            T.SYSTEM_PROMPT: (system_prompt or "")[:4000] or None}
    try:
        promoted = registry.promote_new(cfg.model_name, ev.cand, expected=ev.champ_version, gate_run_id=run_id,
                                        tags=tags, description=f"promoted by gate run {run_id}")["version"]
        mlflow.set_tag(T.PROMOTED_VERSION, promoted)
        return promoted
    except registry.ChampionMoved as e:
        gate.update(decision=rules_mod.ERROR, exit_code=rules_mod.EXIT_CODES[rules_mod.ERROR])
        gate["reasons"].append(str(e))
        return None


def _write_decision(cfg: GateConfig, out: Path, staging: Path, gate: dict, ev: Evidence,
                    variant: str | None) -> None:
    """gate.json + gate_report.md (with the eval outputs they rest on), atomically; artifacts, tags, metrics."""
    import mlflow

    from flywheel.evals import gate as rules_mod
    from flywheel.foundation.io import atomic_dir, write_json
    from flywheel.pipelines import tracking

    report = rules_mod.decision_report(gate, ev, cfg.model_name)
    with atomic_dir(out, force=cfg.force, inputs=[cfg.results] if cfg.results else [], stage="gate") as tmp:
        if (staging / "eval").exists():  # the eval outputs travel with the decision they support
            (staging / "eval").rename(tmp / "eval")
        if (staging / "sample").exists():
            (staging / "sample").rename(tmp / "sample")
        write_json(tmp / "gate.json", gate)
        (tmp / "gate_report.md").write_text(report, encoding="utf-8")
    mlflow.log_artifact(str(out / "gate.json"))
    mlflow.log_artifact(str(out / "gate_report.md"))
    mlflow.set_tags({T.GATE_DECISION: gate["decision"],
                     **({T.GATE_VARIANT: variant} if variant else {})})
    tracking.log_metrics(rules_mod.decision_metrics(gate))


def _decide(cfg: GateConfig, candidate: str, promote: bool, ev: Evidence,
            staging: Path) -> tuple[dict, Path, str | None]:
    """Phase 2, the decision, in its own run: rules, optional promotion, gate.json + report.
    -> (gate, out, shipped variant)."""
    from flywheel.evals import gate as rules_mod
    from flywheel.pipelines import tracking

    variant, family, system_prompt = shipped_variant(ev.results, cfg.variant, cfg.primary.metric,
                                                     ev.candidate_target)
    cand = ev.cand
    inputs = {T.IN_CANDIDATE: candidate, T.IN_EVAL_RUN: ev.eval_run_id, T.IN_SAMPLE_EVAL_RUN: ev.sample_run_id,
              T.IN_CHAMPION: f"{cfg.model_name}/{ev.champ_version}" if ev.champ_version else None,
              T.IN_DATASET_VERSION: cand.meta.get("dataset_version") if cand else None,
              T.IN_TRAIN_RUN: (cand.meta.get("train_run_id") or cand.run_id) if cand else None}
    with tracking.start_run("gate", cfg.run_name or "gate", configured_uri=cfg.tracking_uri, inputs=inputs,
                            params={"model_name": cfg.model_name, "primary.metric": cfg.primary.metric,
                                    "alpha": cfg.alpha, "min_cases": cfg.min_cases, "promote": promote,
                                    "eval_config": cfg.eval_config, "results": cfg.results}) as run:
        run_id = run.info.run_id
        out = Path(cfg.out) if cfg.out else tracking.flywheel_home() / "gate" / run_id
        ab_verdict = None
        if cfg.ab.require:
            try:
                ab_verdict = latest_ab_verdict(cfg.ab.variant, cfg.ab.max_age_hours)
            except InputError as e:
                ev.problems.append(str(e))
        gate = rules_mod.evaluate(ev.results, cfg, baseline=ev.baseline_target, candidate=ev.candidate_target,
                                  variant=variant, variant_family=family, ab_verdict=ab_verdict,
                                  problems=ev.problems)
        gate.update(gate_run_id=run_id, eval_run_id=ev.eval_run_id, sample_eval_run_id=ev.sample_run_id,
                    candidate=candidate, candidate_label=ev.candidate_label, baseline=ev.baseline_label,
                    champion_version=ev.champ_version, model_name=cfg.model_name, system_prompt=system_prompt,
                    config=cfg.model_dump(mode="json"))
        gate["promoted_version"] = _promote(cfg, gate, ev, run_id, variant, system_prompt) if promote else None
        _write_decision(cfg, out, staging, gate, ev, variant)
    return gate, out, variant


def run_gate(cfg: GateConfig, candidate: str, promote: bool = False, *, show_progress: bool = False) -> dict:
    """Gate `candidate` against the champion (or base). Never raises for a bad candidate/champion/eval: those
    are decisions (`error`, exit 2) with a report. Returns {decision, exit_code, run_id, report_path, ...}."""
    import shutil
    import tempfile

    from flywheel.foundation.io import check_output_dir
    from flywheel.pipelines import tracking

    tracking.setup(cfg.tracking_uri)
    if cfg.out:  # refuse a bad `out` before evaluating and promoting, not after
        check_output_dir(cfg.out, inputs=[cfg.results] if cfg.results else [], force=cfg.force)
    staging_root = (Path(cfg.out).parent if cfg.out else tracking.flywheel_home() / "gate")
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gate-eval-", dir=staging_root))
    try:  # also when the tracking server goes away mid-gate: the staging folder is ours to remove
        ev = _gather_evidence(cfg, candidate, promote, staging, show_progress)
        gate, out, variant = _decide(cfg, candidate, promote, ev, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"decision": gate["decision"], "exit_code": gate["exit_code"], "run_id": gate["gate_run_id"],
            "report_path": str(out / "gate_report.md"), "gate_path": str(out / "gate.json"), "gate": gate,
            "promoted_version": gate["promoted_version"], "eval_run_id": ev.eval_run_id,
            "variant": variant, "system_prompt": gate["system_prompt"], "out": str(out)}


def register(app: typer.Typer) -> None:
    @app.command("gate")
    def gate_cmd(
        overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. min_cases=30 variant=concise"),
        candidate: str = typer.Option(..., "--candidate", help="train run id, runs:/…, models:/…, or adapter dir"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="configs/gate.yaml"),
        promote: bool = typer.Option(False, "--promote", help="on pass: register and move the champion alias"),
        results: Optional[Path] = typer.Option(None, "--results", help="re-gate this results.json (no eval)"),
        force: bool = typer.Option(False, "--force", help="replace an existing --out directory Flywheel did not write"),
    ) -> None:
        """Gate a candidate against the champion: exit 0 pass, 1 fail, 2 error; writes gate_report.md."""
        extra = {"results": str(results)} if results else None
        cfg = load_config(GateConfig, config, (overrides or []) + (["force=true"] if force else []), base=extra)
        res = run_gate(cfg, candidate, promote=promote, show_progress=True)
        typer.echo(Path(res["report_path"]).read_text(encoding="utf-8"))
        typer.echo(f"gate {res['decision']}: {res['report_path']}")
        raise typer.Exit(res["exit_code"])
