"""`flywheel ab`: A/B statistics on logged outcomes, with a verdict a reviewer can trust, tracked in MLflow.

    flywheel ab analyze LOGS... [--config configs/ab.yaml] [key=value ...] [--unit COL] [--variant COL]
                        [--metric COL ...] [--control NAME] [--paired] [--alpha A] [--json]
    flywheel ab plan --type mean --baseline 3.6 --sd 1.1 --mde 0.05        # units per arm for a 5 % lift
    flywheel ab plan --type proportion --baseline 0.42 --daily-units 2000 --days 14   # MDE for that traffic

The recipe, top to bottom:
1. config: defaults here <- YAML <- key=value <- flags (flags win: scripts rely on them);
2. read the logs (JSONL/JSON/CSV/Parquet, dotted names reach nested fields), keeping only needed columns;
3. `flywheel.evals.ab.engine.analyze`: clean (every unusable row counted by reason), collapse to the unit, aggregate,
   test, correct, SRM, sequential, Bayesian, verdicts -> one report dict;
4. write `report.json` (exactly what `--json` prints) and one `ab_<metric>.png` per metric, atomically;
5. MLflow run in `flywheel/ab`: params, per-comparison metrics, SRM/verdict tags, the report and plots.

Python entry for `flywheel demo` / `flywheel run`: `run_ab(logs, cfg) -> dict` with `run_id`, `report`,
`out_dir`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
import typer

from flywheel.evals.ab import report as report_mod
from flywheel.evals.ab.config import AbConfig, with_flags
from flywheel.pipelines.config import flatten, load_config, split_args
from flywheel.pipelines import tags as T


def analyze_logs(logs: list[str | Path], cfg: AbConfig) -> dict:
    """Read + analyse, no side effects: the report dict."""
    from flywheel.evals.ab.data import load_table
    from flywheel.evals.ab.engine import analyze

    cols = [cfg.variant, cfg.unit] + [m.source_column for m in cfg.metrics] + [m.covariate for m in cfg.metrics]
    df, problems = load_table(logs, [c for c in cols if c])
    report = analyze(df, cfg, problems=problems)
    report["inputs"] = [str(Path(p).resolve()) for p in logs]
    return report


def _write_outputs(report: dict, folder: Path) -> list[Path]:
    from flywheel.foundation.io import atomic_write_text
    from flywheel.pipelines.tracking import sanitize_metric_name

    files = [atomic_write_text(folder / "report.json", report_mod.report_json(report))]
    for m in dict.fromkeys(r["metric"] for r in report["summaries"]):
        files.append(report_mod.plot_metric(report, m, folder / f"ab_{sanitize_metric_name(m).replace('/', '_')}.png"))
    return files


def _mlflow_metrics(report: dict) -> dict[str, float]:
    out: dict[str, float] = {"rows.read": report["rows"]["read"], "rows.excluded": report["rows"]["excluded"]}
    if report["srm"].get("p_value") is not None:
        out["srm.p_value"] = report["srm"]["p_value"]
    for c in report["comparisons"]:
        k = f"{c['variant']}.{c['metric']}"
        for f in ("estimate", "ci_low", "ci_high", "p_value", "p_adjusted"):
            if c.get(f) is not None:
                out[f"{k}.{f}"] = c[f]
        if c.get("bayesian"):
            out[f"{k}.chance_to_beat_control"] = c["bayesian"]["chance_to_beat_control"]
        if c.get("sequential") and c["sequential"].get("p_value") is not None:
            out[f"{k}.p_sequential"] = c["sequential"]["p_value"]
    for s in report["summaries"]:
        out[f"{s['variant']}.{s['metric']}.mean"] = s["mean"]
        out[f"{s['variant']}.{s['metric']}.n"] = s["n"]
    return out


def run_ab(logs: list[str | Path], cfg: AbConfig | None = None) -> dict:
    """Analyse `logs`, write report + plots (cfg.out, if set), log to MLflow (`flywheel/ab`, if log_mlflow).

    Returns {"run_id": str | None, "report": dict, "out_dir": str | None}.
    """
    from flywheel.foundation.io import atomic_dir

    cfg = cfg or AbConfig()
    logs = [Path(p) for p in logs]
    report = analyze_logs(logs, cfg)
    if cfg.log_mlflow:  # this look joined with the experiment's earlier looks, read from the store
        from flywheel.pipelines import ab_looks, tracking

        report["looks"] = ab_looks.sequential_looks(report, tracking.setup(cfg.tracking_uri))
    out_dir = None
    if cfg.out:
        with atomic_dir(cfg.out, force=cfg.force, inputs=logs, stage="ab") as tmp:
            _write_outputs(report, tmp)
        out_dir = str(Path(cfg.out).resolve())
    run_id = None
    if cfg.log_mlflow:
        run_id = _log_mlflow(report, cfg, logs, out_dir)
    return {"run_id": run_id, "report": report, "out_dir": out_dir}


def _log_mlflow(report: dict, cfg: AbConfig, logs: list[Path], out_dir: str | None) -> str:
    import mlflow

    from flywheel.pipelines import tracking
    from flywheel.foundation.io import sha256_file

    inputs = {T.IN_LOGS: ",".join(str(p.resolve()) for p in logs)[:5000],
              T.IN_LOGS_SHA256: ",".join(sha256_file(p)[:16] for p in logs)[:5000]}
    tags = {T.AB_SRM_STATUS: report["srm"]["status"],
            T.AB_DESIGN: report["design"], T.AB_CONTROL: report["control"],
            T.AB_EXPERIMENT: (report.get("looks") or {}).get("experiment")}
    for v, d in report["verdicts"].items():
        tags[T.ab_verdict_tag(v)] = d["decision"]
    params = flatten(cfg.model_dump(mode="json"))
    with tracking.start_run("ab", run_name=f"ab-{'-'.join(report['variants'])}"[:200], inputs=inputs, tags=tags,
                            params=params, configured_uri=cfg.tracking_uri) as run:
        tracking.log_metrics(_mlflow_metrics(report))
        if out_dir:
            mlflow.log_artifacts(out_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="flywheel-ab-") as tmp:
                _write_outputs(report, Path(tmp))
                mlflow.log_artifacts(tmp)
        return run.info.run_id


# ------------------------------------------------------------------------------------------------ printing
def _fmt(x, d: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{d}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(Console().width, 170))
    rows = report["rows"]
    con.print(f"[bold]A/B analysis[/] design={report['design']} control={report['control']} "
              f"variants={report['variants']} units={report['units']}")
    con.print(f"rows read {rows['read']}, used {rows['used']}, excluded {rows['excluded']}; by reason "
              f"{rows['by_reason'] or '{}'}")
    for reason, ex in rows.get("examples", {}).items():
        con.print(f"  [dim]{reason}: {'; '.join(ex[:3])}[/]")
    srm = report["srm"]
    color = {"ok": "green", "warning": "yellow", "alert": "red"}.get(srm["status"], "white")
    con.print(f"SRM: [{color}]{srm['status']}[/] (chi-square p={_fmt(srm.get('p_value'))}, observed "
              f"{srm.get('observed')}, expected {srm.get('expected')})")
    for w in report.get("warnings", []):
        con.print(f"[yellow]warning:[/] {w}", markup=True, highlight=False)
    t = Table(title=f"comparisons vs {report['control']} (estimate = treatment - control; "
                    f"p_adj: {report['correction']})", show_lines=False)
    for col in ("variant", "metric", "test", "n c/t", "mean c -> t", "estimate [CI]", "lift [CI]", "p", "p_adj",
                "p_seq", "P(beat)*", "guardrail"):
        t.add_column(col, overflow="fold")
    for c in report["comparisons"]:
        lift = c.get("relative_lift") or {}
        t.add_row(c["variant"], c["metric"], c["test"], f"{c['n_control']}/{c['n_treatment']}",
                  f"{_fmt(c['mean_control'])} -> {_fmt(c['mean_treatment'])}",
                  f"{_fmt(c['estimate'])} [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]",
                  "-" if lift.get("estimate") is None else
                  f"{lift['estimate']:+.1%} [{lift['ci_low']:+.1%}, {lift['ci_high']:+.1%}]",
                  _fmt(c["p_value"]), _fmt(c.get("p_adjusted")),
                  _fmt((c.get("sequential") or {}).get("p_value")),
                  _fmt((c.get("bayesian") or {}).get("chance_to_beat_control")),
                  c.get("guardrail_status", ""))
    con.print(t)
    con.print("[dim]* P(beat) = Bayesian chance to beat control (posterior probability, not a p-value); "
              "p_seq = always-valid sequential p-value[/]")
    print_looks(con, report.get("looks"))
    for v, d in report["verdicts"].items():
        color = {"ship": "green", "don't ship": "red", "invalid": "red"}.get(d["decision"], "yellow")
        need = d.get("sample_still_needed_per_arm")
        con.print(f"[bold]{v}[/]: [{color} bold]{d['decision'].upper()}[/]"
                  + (f" (about {need} more units per arm)" if d["decision"] == "keep running" and need else ""))
        for r in d["reasons"]:
            con.print(f"   - {r}")


def print_looks(con, looks: dict | None) -> None:
    """Across the looks of this experiment: running minimum p and intersected confidence sequence."""
    if not looks or looks.get("n_looks", 0) < 2:
        return
    con.print(f"[bold]across {looks['n_looks']} looks[/] (experiment {looks['experiment']}):")
    for c in looks["comparisons"]:
        empty = " [red](empty: the looks disagree)[/]" if c["cs_empty"] else ""
        con.print(f"   {c['variant']} {c['metric']}: p_seq running min {_fmt(c['p_running_min'])}, "
                  f"confidence sequence [{_fmt(c['cs_low'])}, {_fmt(c['cs_high'])}]{empty}")


# ------------------------------------------------------------------------------------------------ CLI
def register(app: typer.Typer) -> None:
    ab = typer.Typer(name="ab", help="A/B statistics: analyze logged outcomes, plan sample sizes.",
                     no_args_is_help=True)
    app.add_typer(ab, name="ab")
    ab.command("analyze")(analyze_cmd)
    ab.command("plan")(plan_cmd)


def analyze_cmd(
    args: list[str] = typer.Argument(..., metavar="LOGS... [KEY=VALUE...]",
                                     help="outcome files (chat-log JSONL, JSON, CSV, Parquet), then key=value "
                                          "config overrides, e.g. correction=bh"),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (configs/ab.yaml)"),
    unit: str | None = typer.Option(None, "--unit", help="unit id column ('none': each row is a unit)"),
    variant: str | None = typer.Option(None, "--variant", help="variant column"),
    metric: list[str] = typer.Option([], "--metric", help="outcome column or configured metric name "
                                                          "(repeatable; replaces the metric list)"),
    control: str | None = typer.Option(None, "--control", help="control variant name"),
    paired: bool = typer.Option(False, "--paired", help="items scored under every variant (unit = item)"),
    alpha: float | None = typer.Option(None, "--alpha", help="significance level"),
    as_json: bool = typer.Option(False, "--json", help="print the machine-readable report only"),
    out: Path | None = typer.Option(None, "--out", "-o", help="also write report.json + plots here"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out directory Flywheel did not write"),
) -> None:
    """Variant vs control for each metric: tests, CIs, corrections, SRM, sequential, verdicts."""
    paths, extra = split_args(args)
    if not paths:
        raise typer.BadParameter("give at least one LOGS file")
    cfg = load_config(AbConfig, config, extra)
    cfg = with_flags(cfg, unit=unit, variant=variant, metric=metric, control=control, paired=paired,
                      alpha=alpha, out=out)
    if force:
        cfg = cfg.model_copy(update={"force": True})
    res = run_ab(paths, cfg)
    if as_json:
        typer.echo(report_mod.report_json(res["report"]), nl=False)
        return
    print_report(res["report"])
    if res["out_dir"]:
        typer.echo(f"report -> {res['out_dir']}/report.json")
    if res["run_id"]:
        typer.echo(f"mlflow run {res['run_id']} (experiment flywheel/ab)")


def plan_cmd(
    type_: str = typer.Option("mean", "--type", help="mean | proportion"),
    baseline: float = typer.Option(..., "--baseline", help="control mean, or control rate for proportions"),
    sd: float | None = typer.Option(None, "--sd", help="standard deviation per unit (means)"),
    mde: float | None = typer.Option(None, "--mde", help="minimum detectable effect -> sample size"),
    absolute: bool = typer.Option(False, "--absolute", help="--mde is absolute (default: relative lift)"),
    n: float | None = typer.Option(None, "--n", help="units per arm -> MDE"),
    daily_units: float | None = typer.Option(None, "--daily-units", help="traffic per day (all arms)"),
    days: float | None = typer.Option(None, "--days", help="duration in days"),
    arms: int = typer.Option(2, "--arms", help="variants including control"),
    alpha: float = typer.Option(0.05, "--alpha"),
    power_: float = typer.Option(0.8, "--power"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Units per arm for an MDE, or the MDE for given traffic and duration (statsmodels power)."""
    from flywheel.evals.ab.power import plan

    r = plan(metric_type=type_, baseline=baseline, sd=sd, mde=mde, relative=not absolute, n_per_arm=n,
             daily_units=daily_units, days=days, arms=arms, alpha=alpha, power=power_)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    if r["solve"] == "sample_size":
        typer.echo(f"units per arm: {r['n_per_arm']}  (total {r['n_total']} over {arms} arms"
                   + (f", about {r['days_needed']} days" if "days_needed" in r else "") + ")")
        typer.echo(f"to detect {r['mde_abs']:.4g} absolute"
                   + (f" ({r['mde_relative']:+.2%} relative)" if r["mde_relative"] is not None else "")
                   + f" on baseline {baseline:g}")
    else:
        typer.echo(f"minimum detectable effect: {r['mde_abs']:.4g} absolute"
                   + (f" ({r['mde_relative']:+.2%} relative)" if r["mde_relative"] is not None else "")
                   + f" with {r['n_per_arm']:.0f} units per arm")
    typer.echo(f"test: {r['test']}; alpha={alpha}, power={power_}" + (f", sd={sd}" if sd else ""))
    typer.echo("assumptions:")
    for a in r["assumptions"]:
        typer.echo(f"  - {a}")
