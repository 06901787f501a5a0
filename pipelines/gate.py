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
from pydantic import Field

from flywheel.evals import markdown as md
from flywheel.evals.gate import TEACHER_FORCED, GateRules, pick_variant
from flywheel.pipelines.config import StageConfig, load_config
from flywheel.foundation.errors import FlywheelError, InputError
from flywheel.foundation.io import read_json
from flywheel.pipelines import tags as T

ROOT = Path(__file__).resolve().parents[1]
CANDIDATE_CASES = "candidate"  # eval.cases: the eval split of the candidate's own training dataset


class SampleSection(StageConfig):
    """Real answers on a few cases for reviewers (display only, never decides)."""

    n_cases: int = Field(8, ge=0, description="cases re-evaluated with real generations; 0: no sample (the "
                         "dashboard then says so)")
    max_new_tokens: int = Field(64, ge=2, description="generation length of the sample")


class GateConfig(GateRules):
    """The rule set (primary, guardrails, alpha, correction, min_cases, ab: `flywheel.evals.gate.GateRules`) plus
    where the evidence comes from and where the decision goes."""

    model_name: str = Field("flywheel-demo", description="registered model; the baseline is its @champion")
    base_model: Optional[str] = Field(None, description="baseline when there is no champion; default: the "
                                      "candidate's base model")
    eval_config: str = Field("configs/eval/demo.yaml", description="the eval suite both sides are evaluated on")
    eval: dict = Field(default_factory=dict, description="overrides for that suite (cases, limit, variants, ...)")
    restrict_metrics: bool = Field(True, description="compute only the metrics the rules read (faster)")
    variant: Optional[str] = Field(None, description="prompt variant that ships; None: the candidate's best, "
                                   "with significance corrected across the variants it was picked from")
    # An NLL-only gate generates one token per case; reviewers get real answers on a few cases, for display only.
    sample_generations: SampleSection = Field(default_factory=SampleSection,
                                              description="real answers on a few cases, for display")
    results: Optional[str] = Field(None, description="re-gate an existing results.json (no eval run)")
    baseline_target: str = Field("champion", description="baseline target name inside results.json")
    candidate_target: str = Field("candidate", description="candidate target name inside results.json")
    out: Optional[str] = Field(None, description="output directory; default <FLYWHEEL_HOME>/gate/<run id>")
    force: bool = Field(False, description="replace an existing `out` Flywheel did not write")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI; default: Flywheel's store")
    run_name: Optional[str] = Field(None, description="MLflow run name")


# -- helpers --------------------------------------------------------------------------------------------------

def _eval_config(cfg: GateConfig, baseline: dict, candidate_uri: str, out: Path):
    """The eval suite from `eval_config` + `eval`, with the two targets the gate compares."""
    from flywheel.pipelines.config import _deep_merge, read_yaml
    from flywheel.pipelines.eval import EvalConfig

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
    import json

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
    path = run.data.tags.get(T.DATASET_PATH) if run is not None else None
    if not path:
        raise InputError(f"eval.cases=candidate: {cand.label} records no mined dataset that can be found "
                         "(flywheel_adapter.json: mine_run_id / dataset_version); set eval.cases=<dir or file>")
    mf = Path(path) / "manifest.json"
    try:
        found = json.loads(mf.read_text(encoding="utf-8")).get("version")
    except (OSError, json.JSONDecodeError, AttributeError):
        raise InputError(f"eval.cases=candidate: {mf}: missing or unreadable (the candidate's dataset)") from None
    if meta.get("dataset_version") and found != meta["dataset_version"]:
        raise InputError(f"eval.cases=candidate: {path} holds dataset version {found}, not {meta['dataset_version']} "
                         "that the candidate was trained on (re-mined since?); set eval.cases")
    return str(path)


def _check_enough_cases(ecfg, min_cases: int) -> None:
    from flywheel.pipelines.eval import eval_cases

    n = len(eval_cases(ecfg).cases)
    if n < min_cases:
        raise InputError(f"min_cases {min_cases}: the eval suite has only {n} cases ({ecfg.cases}"
                         f"{f', limit {ecfg.limit}' if ecfg.limit else ''}); give more cases (eval.cases=...) or lower "
                         "min_cases")


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

    from flywheel.pipelines.eval import EvalConfig, run_eval

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
    client = MlflowClient()
    client.set_tag(eval_run_id, T.EVAL_SAMPLE_RUN, res["run_id"])
    client.set_tag(res["run_id"], T.EVAL_SAMPLE_OF, eval_run_id)
    return res["run_id"]


def system_prompt_for(results: dict, variant: str | None) -> str | None:
    """The variant's system text, its `{{ fields }}` filled with the template's defaults (for SYSTEM)."""
    if not variant:
        return None
    src = next((v.get("source") for v in results.get("variants", []) if v.get("name") == variant), None)
    if src and not Path(src).exists() and (ROOT / src).exists():
        src = str(ROOT / src)  # a path relative to the repo, read from another working directory
    if not src or not Path(src).exists():
        return None
    from flywheel.evals.prompts.templates import VAR_RE, load_template

    t = load_template(src)
    return VAR_RE.sub(lambda m: t.defaults.get(m.group(1), ""), t.system).strip() or None


def latest_ab_verdict(variant: str | None, max_age_hours: float) -> str | None:
    import time

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("flywheel/ab")
    if exp is None or not variant:
        return None
    since = int((time.time() - max_age_hours * 3600) * 1000)
    runs = client.search_runs([exp.experiment_id], f"attributes.start_time > {since}",
                              order_by=["attributes.start_time DESC"], max_results=20)
    for r in runs:
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
    problems = check_identities(results, baseline=cfg.baseline_target, candidate=cfg.candidate_target,
                                candidate_sha256=load_adapter(cand.adapter_dir).sha256, champion_sha256=champ_sha,
                                champion_label=label if champ is not None else "no champion")
    if problems:
        raise InputError(f"{cfg.results}: not evidence for this promotion: " + "; ".join(problems))
    return champ_version, label


# -- the stage ------------------------------------------------------------------------------------------------

def run_gate(cfg: GateConfig, candidate: str, promote: bool = False, *, show_progress: bool = False) -> dict:
    """Gate `candidate` against the champion (or base). Never raises for a bad candidate/champion/eval: those
    are decisions (`error`, exit 2) with a report. Returns {decision, exit_code, run_id, report_path, ...}."""
    import tempfile

    import mlflow

    from flywheel.evals import gate as rules_mod
    from flywheel.pipelines import registry, tracking
    from flywheel.foundation.io import atomic_dir, check_output_dir, write_json

    tracking.setup(cfg.tracking_uri)
    if cfg.out:  # refuse a bad `out` before evaluating and promoting, not after
        check_output_dir(cfg.out, inputs=[cfg.results] if cfg.results else [], force=cfg.force)
    problems: list[str] = []
    results = None
    eval_run_id = sample_run_id = None
    cand = None
    champ_version = None
    baseline_label, candidate_label = "?", candidate
    baseline_target, candidate_target = cfg.baseline_target, cfg.candidate_target
    # Phase 1, the evidence, before the gate run opens (the eval stage logs its own run in flywheel/prompts).
    staging_root = (Path(cfg.out).parent if cfg.out else tracking.flywheel_home() / "gate")
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gate-eval-", dir=staging_root))
    try:
        if cfg.results:
            # Re-gating an existing evaluation: the targets are named in the file.
            rp = Path(cfg.results)
            if not rp.exists():
                raise InputError(f"results {rp}: no such file")
            results = read_json(rp)
            eval_run_id = results.get("run_id")
            baseline_label = cfg.baseline_target
            if _looks_like_model(candidate):  # then --promote can register it
                cand = registry.resolve_model(candidate, "candidate")
                candidate_label = cand.label
            if promote:
                champ_version, baseline_label = _check_results_identity(cfg, results, cand)
        else:
            cand = registry.resolve_model(candidate, "candidate")
            candidate_label = cand.label
            champ = registry.champion(cfg.model_name)
            if champ is not None:
                champ_version = str(champ.version)
                # Read it now: a champion whose files are gone must stop the gate, not be skipped.
                registry.resolve_model(f"models:/{cfg.model_name}/{champ_version}", "champion")
                baseline = {"name": "champion", "adapter": f"models:/{cfg.model_name}/{champ_version}"}
                baseline_label = f"models:/{cfg.model_name}@champion (v{champ_version})"
            else:
                base = cfg.base_model or cand.meta.get("base_model") or "smollm2-135m-instruct"
                baseline = {"name": "base", "base": base}
                baseline_label = f"base model {base} (no champion yet)"
            baseline_target, candidate_target = baseline["name"], "candidate"
            from flywheel.pipelines.eval import run_eval

            ecfg = _eval_config(cfg, baseline, cand.uri if cand.uri.startswith(("runs:/", "models:/"))
                                else str(cand.adapter_dir), staging)
            if ecfg.cases == CANDIDATE_CASES:
                ecfg.cases = _candidate_cases(cand)
            _check_enough_cases(ecfg, cfg.min_cases)  # seconds, not the minutes of an eval doomed to `error`
            res = run_eval(ecfg, show_progress=show_progress)
            results, eval_run_id = res["results"], res["run_id"]
            sample_run_id = _sample_generations(cfg, ecfg, eval_run_id, staging / "sample", show_progress)
    except FlywheelError as e:
        problems.append(str(e))
    except Exception as e:  # a crashed evaluation is an error decision, with the cause in the report
        problems.append(f"evaluation crashed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        traceback.print_exc()
    finally:
        while mlflow.active_run():  # a crash inside eval may leave its run open
            mlflow.end_run(status="FAILED")

    variant, family = cfg.variant, []
    if results is not None and variant is None:  # the gate picks: it then corrects for the choice
        variant, family = pick_variant(results, cfg.primary.metric, candidate_target)
    system_prompt = None
    if results is not None:
        try:
            system_prompt = system_prompt_for(results, variant)
        except FlywheelError:
            system_prompt = None

    # Phase 2, the decision, in its own run.
    inputs = {T.IN_CANDIDATE: candidate, T.IN_EVAL_RUN: eval_run_id, T.IN_SAMPLE_EVAL_RUN: sample_run_id,
              T.IN_CHAMPION: f"{cfg.model_name}/{champ_version}" if champ_version else None,
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
            ab_verdict = latest_ab_verdict(cfg.ab.variant or variant, cfg.ab.max_age_hours)
        gate = rules_mod.evaluate(results, cfg, baseline=baseline_target,
                                  candidate=candidate_target, variant=variant, variant_family=family,
                                  ab_verdict=ab_verdict,
                                  problems=problems)
        gate.update(gate_run_id=run_id, eval_run_id=eval_run_id, sample_eval_run_id=sample_run_id,
                    candidate=candidate,
                    candidate_label=candidate_label, baseline=baseline_label, champion_version=champ_version,
                    model_name=cfg.model_name, system_prompt=system_prompt, config=cfg.model_dump(mode="json"))

        promoted = None
        if promote and gate["decision"] == rules_mod.PASS:
            if cand is None:
                gate["reasons"].append("--promote needs a candidate model reference (run id, runs:/, dir)")
            else:
                tags = {T.input_tag(T.IN_EVAL_RUN): eval_run_id, T.input_tag(T.IN_GATE_RUN): run_id,
                        T.PROMPT_VARIANT: variant,
                        T.SYSTEM_PROMPT: (system_prompt or "")[:4000] or None}
                try:
                    # Compare-and-set: only if @champion is still what the evaluation compared against.
                    promoted = registry.promote_new(cfg.model_name, cand, expected=champ_version, gate_run_id=run_id,
                                                    tags=tags, description=f"promoted by gate run {run_id}")["version"]
                    mlflow.set_tag(T.PROMOTED_VERSION, promoted)
                except registry.ChampionMoved as e:
                    gate.update(decision=rules_mod.ERROR, exit_code=rules_mod.EXIT_CODES[rules_mod.ERROR])
                    gate["reasons"].append(str(e))
        gate["promoted_version"] = promoted

        report = rules_mod.report_markdown(gate, baseline_label=baseline_label, candidate_label=candidate_label)
        if promoted:
            report += f"\nPromoted: {md.code(f'models:/{cfg.model_name}/{promoted}')} is now `@champion`.\n"
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
        primary = gate["checks"][0] if gate["checks"] else {}
        tracking.log_metrics({"exit_code": gate["exit_code"], "primary.baseline": primary.get("baseline"),
                              "primary.candidate": primary.get("candidate"),
                              "primary.difference": primary.get("difference"),
                              "primary.p_adjusted": primary.get("p_adjusted")})
    import shutil

    shutil.rmtree(staging, ignore_errors=True)
    return {"decision": gate["decision"], "exit_code": gate["exit_code"], "run_id": run_id,
            "report_path": str(out / "gate_report.md"), "gate_path": str(out / "gate.json"), "gate": gate,
            "promoted_version": promoted, "eval_run_id": eval_run_id, "variant": variant,
            "system_prompt": system_prompt, "out": str(out)}


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
