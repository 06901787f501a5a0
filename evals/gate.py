"""Gate rules: may a candidate replace the champion? Plain data in (an eval `results.json`), a decision out.

The rule set, and why each part is there:
- **Primary metric, MLflow `MetricThreshold` semantics** (`mlflow.models.evaluation.validation`): with
  greater-is-better, pass iff `candidate >= threshold`, `candidate >= baseline + min_absolute_change` and
  `candidate >= baseline + min_relative_change * |baseline|` (each only when set; mirrored for lower-is-better;
  a zero baseline turns the relative rule into "better by 1e-10", as MLflow does). This is the "big enough to
  matter" half.
- **Significance after correction**: the paired difference on the same cases (computed by the eval stage with
  `flywheel.evals.ab.paired.compare_paired`, Holm-corrected there per metric) must point the right way with adjusted
  p < alpha; the gate corrects again across its own family of significance checks (several primary variants),
  so "we looked at three prompts" cannot buy a pass. This is the "not luck" half.
- **Guardrails, non-inferiority**: a guardrail may get worse, but not by more than its margin: the whole
  confidence interval of the difference must stay on the good side of `-margin` (a margin can be absolute or
  relative to the baseline). An interval that is merely wide fails: no evidence is not evidence of no harm.
- **Fail closed**: a missing metric or comparison, NaN anywhere, fewer paired cases than `min_cases`, or a
  required A/B verdict that is absent is an *error* (exit 2), never a pass. `fail` (exit 1) means the evidence
  was read and says no.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

PASS, FAIL, ERROR = "pass", "fail", "error"
EXIT_CODES = {PASS: 0, FAIL: 1, ERROR: 2}
ZERO_BASELINE_EPS = 1e-10  # MLflow's fallback when the baseline is exactly 0


@dataclass
class PrimaryRule:
    metric: str
    greater_is_better: bool | None = None  # None: take the eval stage's `direction` for the metric
    threshold: float | None = None
    min_absolute_change: float | None = None
    min_relative_change: float | None = None
    require_significance: bool = True


@dataclass
class GuardrailRule:
    metric: str
    margin: float = 0.0  # absolute non-inferiority margin
    relative_margin: float | None = None  # or a fraction of |baseline|; the larger of the two is used
    greater_is_better: bool | None = None


@dataclass
class GateRules:
    primary: PrimaryRule
    guardrails: list[GuardrailRule] = field(default_factory=list)
    alpha: float = 0.05
    correction: str = "holm"
    min_cases: int = 20
    require_ab_verdict: bool = False


@dataclass
class Check:
    metric: str
    role: str  # "primary" | "guardrail" | "ab" | "evidence"
    status: str  # PASS / FAIL / ERROR
    baseline: float | None = None
    candidate: float | None = None
    difference: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    p_adjusted: float | None = None
    n: int | None = None
    rule: str = ""
    reasons: list[str] = field(default_factory=list)
    test: str | None = None


def _finite(*xs: Any) -> bool:
    return all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in xs)


def _direction(cells: Sequence[dict], metric: str, configured: bool | None) -> bool | None:
    if configured is not None:
        return configured
    dirs = {c.get("direction") for c in cells if c.get("metric") == metric}
    if dirs == {"higher"}:
        return True
    if dirs == {"lower"}:
        return False
    return None


def find_evidence(results: dict, metric: str, baseline: str, candidate: str,
                  variant: str | None = None) -> tuple[dict | None, dict | None, dict | None, str | None]:
    """(baseline cell, candidate cell, comparison, problem) for one metric between two targets.

    Comparisons carry `control_target`/`treatment_target` (+ variants); older files only the labels
    `target/variant` in `control`/`variant`, which are accepted too.
    """
    cells = [c for c in results.get("cells", []) if c.get("metric") == metric]
    variants = sorted({c.get("variant") for c in cells if c.get("target") in (baseline, candidate)})
    if variant is None:
        if len(variants) > 1:
            return None, None, None, (f"{metric}: results hold several prompt variants {variants}; set the gate's "
                                      "`variant` to the one that will ship")
        variant = variants[0] if variants else None

    def cell(target):
        hits = [c for c in cells if c.get("target") == target and (variant is None or c.get("variant") == variant)]
        return hits[0] if len(hits) == 1 else None

    b, c = cell(baseline), cell(candidate)
    if b is None or c is None:
        missing = [n for n, x in (("baseline " + baseline, b), ("candidate " + candidate, c)) if x is None]
        return b, c, None, f"{metric}: no result for {' and '.join(missing)}" + (
            f" (variant {variant})" if variant else "")
    comp = None
    for x in results.get("comparisons", []):
        if x.get("metric") != metric:
            continue
        if "control_target" in x:
            hit = (x.get("control_target") == baseline and x.get("treatment_target") == candidate
                   and (variant is None or (x.get("control_variant") == variant
                                            and x.get("treatment_variant") == variant)))
        else:
            hit = (x.get("control") in (baseline, f"{baseline}/{variant}")
                   and x.get("variant") in (candidate, f"{candidate}/{variant}"))
        if hit:
            comp = x
            break
    if comp is None:
        return b, c, None, f"{metric}: no paired comparison of {candidate} against {baseline} in the results"
    return b, c, comp, None


def _abs_needed(rule: PrimaryRule, base: float) -> tuple[float, list[str]]:
    """The improvement (in the good direction) the thresholds demand, and their description."""
    need, parts = 0.0, []
    if rule.min_absolute_change is not None:
        need = max(need, rule.min_absolute_change)
        parts.append(f"min_absolute_change {rule.min_absolute_change:g}")
    if rule.min_relative_change is not None:
        rel = rule.min_relative_change * abs(base) if base != 0 else ZERO_BASELINE_EPS
        need = max(need, rel)
        parts.append(f"min_relative_change {rule.min_relative_change:g}")
    return need, parts


def evaluate(results: dict | None, rules: GateRules, *, baseline: str, candidate: str,
             variant: str | None = None, ab_verdict: str | None = None, problems: Sequence[str] = ()) -> dict:
    """Apply `rules` to `results` (an eval results.json) comparing target `candidate` against `baseline`.

    `problems` are errors found upstream (crashed eval, unreadable champion): they force `error`.
    Returns {decision, exit_code, checks: [Check as dict], reasons: [str], variant}.
    """
    checks: list[Check] = []
    reasons: list[str] = list(problems)
    for p in problems:
        checks.append(Check(metric="-", role="evidence", status=ERROR, reasons=[p]))
    if results is None:
        if not problems:
            checks.append(Check(metric="-", role="evidence", status=ERROR, reasons=["no evaluation results"]))
            reasons.append("no evaluation results")
        return _decide(checks, reasons, variant)
    if not 0 < rules.alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {rules.alpha}")

    cells = results.get("cells", [])
    pr = rules.primary
    b, c, comp, problem = find_evidence(results, pr.metric, baseline, candidate, variant)
    primary = Check(metric=pr.metric, role="primary", status=PASS)
    checks.append(primary)
    gib = _direction(cells, pr.metric, pr.greater_is_better)
    if problem or gib is None:
        primary.status = ERROR
        primary.reasons.append(problem or f"{pr.metric}: direction unknown; set greater_is_better")
    else:
        _fill(primary, b, c, comp)
        _check_numbers(primary, rules.min_cases)
        if primary.status != ERROR:
            sign = 1.0 if gib else -1.0
            gain = sign * (primary.candidate - primary.baseline)  # > 0 means better
            need, parts = _abs_needed(pr, primary.baseline)
            desc = [("higher" if gib else "lower") + " is better"]
            if pr.threshold is not None:
                desc.append(f"threshold {pr.threshold:g}")
                ok = primary.candidate >= pr.threshold if gib else primary.candidate <= pr.threshold
                if not ok:
                    primary.status = FAIL
                    primary.reasons.append(f"{pr.metric} = {primary.candidate:.4g} is not "
                                           f"{'>=' if gib else '<='} threshold {pr.threshold:g}")
            desc += parts
            # Compared the way MLflow writes it (candidate vs baseline +/- need), not as a difference, so
            # that 1.6 vs 2.0 - 0.4 is the exact boundary it looks like.
            meets = (primary.candidate >= primary.baseline + need if gib
                     else primary.candidate <= primary.baseline - need)
            if parts and not meets:
                primary.status = FAIL
                primary.reasons.append(f"{pr.metric} improved by {gain + 0.0:+.4g} ({'higher' if gib else 'lower'} is "
                                       f"better); the rule needs at least {need:.4g}")
            if pr.require_significance:
                desc.append(f"adjusted p < {rules.alpha:g}")
            primary.rule = ", ".join(desc)

    # Significance: corrected again across the gate's own family (here: the primary check).
    fam = [x for x in checks if x.role == "primary" and x.status != ERROR and pr.require_significance]
    if fam:
        from flywheel.evals.ab.multiple import adjust_pvalues

        adj = adjust_pvalues([x.p_adjusted if x.p_adjusted is not None else x.p_value for x in fam],
                             rules.correction)
        for x, p in zip(fam, adj):
            x.p_adjusted = p
            sign = 1.0 if gib else -1.0
            if not (p < rules.alpha and sign * x.difference > 0):
                x.status = FAIL
                why = ("no difference: the candidate scores exactly what the champion scores" if x.difference == 0
                       else f"difference {x.difference:+.4g} is in the wrong direction" if sign * x.difference < 0
                       else f"not significant: adjusted p = {p:.3g} >= {rules.alpha:g}")
                x.reasons.append(f"{x.metric}: {why}")

    for g in rules.guardrails:
        b, c, comp, problem = find_evidence(results, g.metric, baseline, candidate, variant)
        chk = Check(metric=g.metric, role="guardrail", status=PASS)
        checks.append(chk)
        ggib = _direction(cells, g.metric, g.greater_is_better)
        if problem or ggib is None:
            chk.status = ERROR
            chk.reasons.append(problem or f"{g.metric}: direction unknown; set greater_is_better")
            continue
        _fill(chk, b, c, comp)
        _check_numbers(chk, rules.min_cases)
        if chk.status == ERROR:
            continue
        margin = max(g.margin, (g.relative_margin or 0.0) * abs(chk.baseline))
        # Worst plausible change in the good direction: the CI end on the bad side.
        worst = chk.ci_low if ggib else -chk.ci_high
        chk.rule = (f"non-inferior within {margin:.4g} ({'higher' if ggib else 'lower'} is better; "
                    f"{100 * (1 - rules.alpha):g}% CI of the difference)")
        if worst < -margin:
            chk.status = FAIL
            chk.reasons.append(f"{g.metric}: may have got worse by up to {-worst:.4g} (CI {chk.ci_low:+.4g} .. "
                               f"{chk.ci_high:+.4g}), more than the margin {margin:.4g}")

    if rules.require_ab_verdict:
        chk = Check(metric="ab verdict", role="ab", status=PASS, rule="latest `flywheel ab` verdict is ship")
        if ab_verdict is None:
            chk.status = ERROR
            chk.reasons.append("a recent `flywheel ab` verdict is required and none was found")
        elif ab_verdict.lower() != "ship":
            chk.status = FAIL
            chk.reasons.append(f"the latest `flywheel ab` verdict is {ab_verdict!r}, not 'ship'")
        checks.append(chk)

    for x in checks:
        if x.role != "evidence":
            reasons.extend(x.reasons)
    return _decide(checks, reasons, variant)


def _short(h: str | None) -> str:
    return f"{h[:12]}…" if h else "none"


def check_identities(results: dict, *, baseline: str, candidate: str, candidate_sha256: str,
                     champion_sha256: str | None, champion_label: str) -> list[str]:
    """Why `results` is not evidence for promoting *this* candidate over *this* champion (empty: it is).

    An eval's `targets` record what was evaluated (`adapter_sha256` of the adapter weights, `base_sha256`). The
    candidate's weights must be the ones evaluated as `candidate`; the `baseline` target must be the current
    champion's weights, or, with no champion (`champion_sha256` None), a bare base model, the candidate's own.
    Results that record no identity cannot prove either, so they fail too.
    """
    targets = {t.get("name"): t for t in results.get("targets") or [] if isinstance(t, dict)}
    problems = []
    c, b = targets.get(candidate), targets.get(baseline)
    if c is None or not c.get("adapter_sha256"):
        problems.append(f"results record no adapter sha256 for target {candidate!r}, so they cannot show the "
                        "candidate was evaluated (re-run the eval)")
    elif c["adapter_sha256"] != candidate_sha256:
        problems.append(f"results evaluated target {candidate!r} = adapter {_short(c['adapter_sha256'])}, not the "
                        f"candidate being promoted (adapter {_short(candidate_sha256)})")
    if b is None or not b.get("base_sha256"):
        problems.append(f"results record no identity for baseline target {baseline!r} (re-run the eval)")
    elif champion_sha256 is None:
        if b.get("adapter_sha256"):
            problems.append(f"champion moved: results compare against adapter {_short(b['adapter_sha256'])}, "
                            f"but there is {champion_label} now; the baseline must be the base model")
        elif c is not None and c.get("base_sha256") and b["base_sha256"] != c["base_sha256"]:
            problems.append(f"results compare against base {_short(b['base_sha256'])}, not the candidate's base "
                            f"{_short(c['base_sha256'])}")
    elif b.get("adapter_sha256") != champion_sha256:
        was = f"adapter {_short(b['adapter_sha256'])}" if b.get("adapter_sha256") else "the base model"
        problems.append(f"champion moved: results compare against {was}, but @champion is now {champion_label} "
                        f"(adapter {_short(champion_sha256)})")
    return problems


def _fill(chk: Check, b: dict, c: dict, comp: dict) -> None:
    chk.baseline, chk.candidate = b.get("mean"), c.get("mean")
    chk.difference = comp.get("estimate")
    chk.ci_low, chk.ci_high = comp.get("ci_low"), comp.get("ci_high")
    chk.p_value, chk.p_adjusted = comp.get("p_value"), comp.get("p_adjusted")
    chk.n = comp.get("n", min(b.get("n") or 0, c.get("n") or 0))
    chk.test = comp.get("test")


def _check_numbers(chk: Check, min_cases: int) -> None:
    nums = {"baseline": chk.baseline, "candidate": chk.candidate, "difference": chk.difference,
            "ci_low": chk.ci_low, "ci_high": chk.ci_high, "p_value": chk.p_value}
    bad = [k for k, v in nums.items() if not _finite(v)]
    if chk.p_adjusted is not None and not _finite(chk.p_adjusted):
        bad.append("p_adjusted")
    if bad:
        chk.status = ERROR
        chk.reasons.append(f"{chk.metric}: {', '.join(bad)} missing or not a finite number")
    if not isinstance(chk.n, int) or chk.n < min_cases:
        chk.status = ERROR
        chk.reasons.append(f"{chk.metric}: {chk.n} paired cases, fewer than the minimum {min_cases}")


def _decide(checks: list[Check], reasons: list[str], variant: str | None) -> dict:
    statuses = {c.status for c in checks}
    decision = ERROR if ERROR in statuses or not checks else FAIL if FAIL in statuses else PASS
    if decision == PASS:
        reasons = []
    return {"decision": decision, "exit_code": EXIT_CODES[decision], "variant": variant,
            "checks": [asdict(c) for c in checks], "reasons": list(dict.fromkeys(reasons))}


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return format(x, spec) if math.isfinite(x) else str(x)
    return str(x)


def report_markdown(gate: dict, *, baseline_label: str, candidate_label: str, title: str = "Flywheel gate") -> str:
    """`gate_report.md`: short enough for a PR comment, complete enough to audit the decision."""
    icon = {PASS: "PASS", FAIL: "FAIL", ERROR: "ERROR"}[gate["decision"]]
    lines = [f"## {title}: **{icon}** (exit {gate['exit_code']})", "",
             f"- champion / baseline: `{baseline_label}`", f"- candidate: `{candidate_label}`"]
    if gate.get("variant"):
        lines.append(f"- prompt variant: `{gate['variant']}`")
    for k in ("eval_run_id", "gate_run_id"):
        if gate.get(k):
            lines.append(f"- {k.replace('_', ' ')}: `{gate[k]}`")
    lines += ["", "| check | metric | champion | candidate | difference | CI | p (adj.) | n | rule | result |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in gate["checks"]:
        ci = f"{_fmt(c['ci_low'], '+.4g')} .. {_fmt(c['ci_high'], '+.4g')}" if c["ci_low"] is not None else "–"
        p = f"{_fmt(c['p_value'], '.3g')} ({_fmt(c['p_adjusted'], '.3g')})" if c["p_value"] is not None else "–"
        rule = (c["rule"] or "–").replace("|", "\\|")
        lines.append(f"| {c['role']} | {c['metric']} | {_fmt(c['baseline'])} | {_fmt(c['candidate'])} | "
                     f"{_fmt(c['difference'], '+.4g')} | {ci} | {p} | {_fmt(c['n'])} | {rule} | "
                     f"{c['status'].upper()} |")
    if gate["reasons"]:
        lines += ["", "Reasons:"] + [f"- {r}" for r in gate["reasons"]]
    return "\n".join(lines) + "\n"
