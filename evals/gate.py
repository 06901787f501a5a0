"""Gate rules: may a candidate replace the champion? Plain data in (an eval `results.json`), a decision out.

The rule set, and why each part is there:
- **Primary metric, MLflow `MetricThreshold` semantics** (`mlflow.models.evaluation.validation`): with
  greater-is-better, pass iff `candidate >= threshold`, `candidate >= baseline + min_absolute_change` and
  `candidate >= baseline + min_relative_change * |baseline|` (each only when set; mirrored for lower-is-better;
  a zero baseline turns the relative rule into "better by 1e-10", as MLflow does). This is the "big enough to
  matter" half.
- **Significance after correction**: the paired difference on the same cases (computed by the eval stage with
  `flywheel.evals.ab.paired.compare_paired`, Holm-corrected there per metric) must point the right way with adjusted
  p < alpha. When the gate picks the shipped prompt variant itself (the candidate's best of several,
  `pick_variant`), it corrects again (`correction`, Holm by default) across the candidate-vs-baseline comparisons
  of every variant it could have picked and uses the chosen variant's corrected p, so "we looked at three prompts
  and kept the best" cannot buy a pass. A variant fixed in advance is a family of one. This is the "not luck"
  half.
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
from pathlib import Path
from typing import Any, Optional, Sequence

from pydantic import Field

from flywheel.evals import markdown as md
from flywheel.evals.ab.multiple import CorrectionMethod
from flywheel.evals.prompts import results as rs
from flywheel.foundation.config import StageConfig
from flywheel.foundation.errors import FlywheelError, InputError

PASS, FAIL, ERROR = "pass", "fail", "error"
EXIT_CODES = {PASS: 0, FAIL: 1, ERROR: 2}
ZERO_BASELINE_EPS = 1e-10  # MLflow's fallback when the baseline is exactly 0


# metrics computed from the reference (or a preference pair's two answers), not from generated text
TEACHER_FORCED = frozenset({"nll", "preference_accuracy"})


class PrimaryRule(StageConfig):
    """The metric that decides: MLflow `MetricThreshold` semantics plus corrected significance."""

    metric: str = Field("nll", description="the eval stage's metric that decides (nll: reference NLL, lower is "
                        "better)")
    greater_is_better: bool | None = Field(None, description="None: the direction results.json records for the "
                                           "metric")
    threshold: float | None = Field(None, description="MetricThreshold.threshold: an absolute bar the candidate "
                                    "must reach; None: no bar")
    min_absolute_change: float | None = Field(None, gt=0, description="the candidate must beat the baseline by at "
                                              "least this much; None: no such rule")
    # One default for the CLI and for Python callers: "better" means better by at least 1 % of |baseline|, so a
    # rounding-sized gain on a large eval set cannot replace the champion. None turns the rule off.
    min_relative_change: float | None = Field(0.01, ge=0, le=1, description="the candidate must beat the "
                                              "baseline by at least this fraction of |baseline| (0.01 = 1 %); "
                                              "None: no such rule")
    require_significance: bool = Field(True, description="the paired difference must point the right way with "
                                       "adjusted p < alpha")


class GuardrailRule(StageConfig):
    """A metric that may get worse, but not by more than its margin (non-inferiority)."""

    metric: str = Field(description="the eval stage's metric to protect")
    margin: float = Field(0.0, ge=0, description="absolute non-inferiority margin")
    relative_margin: float | None = Field(None, ge=0, description="or a fraction of |baseline|; the larger of the "
                                          "two margins applies")
    greater_is_better: bool | None = Field(None, description="None: the direction results.json records")


class AbRule(StageConfig):
    """An optional `flywheel ab` verdict the gate must see."""

    require: bool = Field(False, description="a recent `flywheel ab` verdict must say ship")
    variant: str | None = Field(None, description="the A/B variant whose verdict counts (the logs' prompt_variant); "
                                "None: the treatment of the latest `flywheel ab` run when it has exactly one")
    max_age_hours: float = Field(24 * 7, gt=0, description="verdicts older than this are not read")


class GateRules(StageConfig):
    """The whole rule set. `flywheel gate`'s config (`GateConfig`) extends it with where the evidence comes from."""

    primary: PrimaryRule = Field(default_factory=PrimaryRule, description="the deciding metric")
    guardrails: list[GuardrailRule] = Field(default_factory=list, description="metrics that may not get worse "
                                            "by more than their margin")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level (after correction); guardrail CIs "
                         "are 1 - alpha")
    correction: CorrectionMethod = Field("holm", description="multiple-comparison correction across the prompt "
                                         "variants the gate picked from (flywheel.evals.ab.multiple)")
    min_cases: int = Field(20, ge=2, description="fewer paired cases than this: error, not a decision")
    ab: AbRule = Field(default_factory=AbRule, description="the optional `flywheel ab` verdict")


class SampleSection(StageConfig):
    """Real answers on a few cases for reviewers (display only, never decides)."""

    n_cases: int = Field(8, ge=0, description="cases re-evaluated with real generations; 0: no sample (the "
                         "dashboard then says so)")
    max_new_tokens: int = Field(64, ge=2, description="generation length of the sample")


class GateConfig(GateRules):
    """`flywheel gate`'s config: the rule set (primary, guardrails, alpha, correction, min_cases, ab: `GateRules`)
    plus where the evidence comes from and where the decision goes."""

    model_name: str = Field("flywheel", description="registered model; the baseline is its @champion")
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
    baseline_target: Optional[str] = Field(None, description=(
        "baseline target name inside results.json; None: `champion` when the file has it (a gate's own eval), else "
        "the first target that is not the candidate (`base` in what `flywheel eval candidate=...` writes)"))
    candidate_target: str = Field("candidate", description="candidate target name inside results.json")
    out: Optional[str] = Field(None, description="output directory; default <FLYWHEEL_HOME>/gate/<run id>")
    force: bool = Field(False, description="replace an existing `out` Flywheel did not write")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI; default: Flywheel's store")
    run_name: Optional[str] = Field(None, description="MLflow run name")


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


def _direction(results: dict, metric: str, configured: bool | None) -> bool | None:
    return configured if configured is not None else rs.direction(results, metric)


def pick_variant(results: dict, metric: str, candidate: str) -> tuple[str | None, list[str]]:
    """The prompt variant that ships when none is configured: the candidate's best on `metric`. Returns it and the
    family it was picked from (every variant the candidate has a cell for), which `evaluate` corrects across."""
    cells = [c for c in rs.cells_for(results, metric, candidate) if _finite(c.get("mean"))]
    if not cells:
        return None, []
    sign = -1.0 if rs.direction(results, metric) is False else 1.0
    best = max(cells, key=lambda c: sign * c["mean"])["variant"]
    return best, rs.variants_of(results, metric, candidate)


def find_evidence(results: dict, metric: str, baseline: str, candidate: str,
                  variant: str | None = None) -> tuple[dict | None, dict | None, dict | None, str | None]:
    """(baseline cell, candidate cell, comparison, problem) for one metric between two targets."""
    if variant is None:
        variants = sorted({c.get("variant") for t in (baseline, candidate) for c in rs.cells_for(results, metric, t)})
        if len(variants) > 1:
            return None, None, None, (f"{metric}: results hold several prompt variants {variants}; set the gate's "
                                      "`variant` to the one that will ship")
        variant = variants[0] if variants else None

    def cell(target):
        hits = rs.cells_for(results, metric, target, variant)
        return hits[0] if len(hits) == 1 else None

    b, c = cell(baseline), cell(candidate)
    if b is None or c is None:
        missing = [n for n, x in (("baseline " + baseline, b), ("candidate " + candidate, c)) if x is None]
        return b, c, None, f"{metric}: no result for {' and '.join(missing)}" + (
            f" (variant {variant})" if variant else "")
    broken = [f"{role} {name}: {x['n_failed']} failed generations" for role, name, x in
              (("baseline", baseline, b), ("candidate", candidate, c)) if x.get("n_failed")]
    if broken:  # failed cases are missing evidence: the cells' means describe the survivors only
        return b, c, None, f"{metric}: " + "; ".join(broken) + " (fix the target and re-run the eval)"
    comp = rs.comparison_for(results, metric, baseline, candidate, variant)
    if comp is None:
        return b, c, None, f"{metric}: no paired comparison of {candidate} against {baseline} in the results"
    return b, c, comp, None


def _family_p(results: dict, metric: str, baseline: str, candidate: str, variant: str | None,
              family: Sequence[str], own_p: float, method: str) -> float:
    """The chosen variant's p, corrected across every variant the gate could have picked: each variant's
    candidate-vs-baseline comparison on the primary metric is one test of the family. A variant without a
    comparison counts as p = 1 (it was still a look), so a missing row cannot shrink the family."""
    from flywheel.evals.ab.multiple import adjust_pvalues

    ps = []
    for v in dict.fromkeys(list(family) + [variant]):
        if v == variant:
            ps.append(own_p)
            continue
        comp = rs.comparison_for(results, metric, baseline, candidate, v)
        p = comp.get("p_adjusted", comp.get("p_value")) if comp else None
        ps.append(p if _finite(p) else 1.0)
    return adjust_pvalues(ps, method)[list(dict.fromkeys(list(family) + [variant])).index(variant)]


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
             variant: str | None = None, variant_family: Sequence[str] = (), ab_verdict: str | None = None,
             problems: Sequence[str] = ()) -> dict:
    """Apply `rules` to `results` (an eval results.json) comparing target `candidate` against `baseline`.

    `variant_family`: the prompt variants `variant` was picked from (`pick_variant`); the primary metric's p is
    corrected across their comparisons. Empty when the variant was fixed in advance (a family of one).
    `problems` are errors found upstream (crashed eval, unreadable champion): they force `error`.
    Returns {decision, exit_code, checks: [Check as dict], reasons: [str], variant, variant_family}.
    """
    checks = [Check(metric="-", role="evidence", status=ERROR, reasons=[p]) for p in problems]
    reasons: list[str] = list(problems)
    if results is None:
        if not problems:
            checks.append(Check(metric="-", role="evidence", status=ERROR, reasons=["no evaluation results"]))
            reasons.append("no evaluation results")
        return _decide(checks, reasons, variant, variant_family)
    checks.append(_primary_check(results, rules, baseline, candidate, variant, variant_family))
    checks += [_guardrail_check(results, g, rules, baseline, candidate, variant) for g in rules.guardrails]
    if rules.ab.require:
        checks.append(_ab_check(ab_verdict))
    for x in checks:
        if x.role != "evidence":
            reasons.extend(x.reasons)
    return _decide(checks, reasons, variant, variant_family)


def _read_check(results: dict, rule: PrimaryRule | GuardrailRule, role: str, rules: GateRules, baseline: str,
                candidate: str, variant: str | None) -> tuple[Check, bool | None]:
    """A check filled from the evidence for `rule.metric`, or an ERROR check saying what is missing."""
    b, c, comp, problem = find_evidence(results, rule.metric, baseline, candidate, variant)
    chk = Check(metric=rule.metric, role=role, status=PASS)
    gib = _direction(results, rule.metric, rule.greater_is_better)
    if problem or gib is None:
        chk.status = ERROR
        chk.reasons.append(problem or f"{rule.metric}: direction unknown; set greater_is_better")
        return chk, gib
    _fill(chk, b, c, comp)
    _check_numbers(chk, rules.min_cases)
    return chk, gib


def _primary_check(results: dict, rules: GateRules, baseline: str, candidate: str, variant: str | None,
                   family: Sequence[str]) -> Check:
    pr = rules.primary
    chk, gib = _read_check(results, pr, "primary", rules, baseline, candidate, variant)
    if chk.status == ERROR:
        return chk
    desc = [("higher" if gib else "lower") + " is better"]
    if pr.threshold is not None:
        desc.append(f"threshold {pr.threshold:g}")
        if not (chk.candidate >= pr.threshold if gib else chk.candidate <= pr.threshold):
            chk.status = FAIL
            chk.reasons.append(f"{pr.metric} = {chk.candidate:.4g} is not {'>=' if gib else '<='} threshold "
                               f"{pr.threshold:g}")
    need, parts = _abs_needed(pr, chk.baseline)
    desc += parts
    # Compared the way MLflow writes it (candidate vs baseline +/- need), not as a difference, so
    # that 1.6 vs 2.0 - 0.4 is the exact boundary it looks like.
    meets = chk.candidate >= chk.baseline + need if gib else chk.candidate <= chk.baseline - need
    if parts and not meets:
        gain = (1.0 if gib else -1.0) * (chk.candidate - chk.baseline)
        chk.status = FAIL
        chk.reasons.append(f"{pr.metric} improved by {gain + 0.0:+.4g} ({'higher' if gib else 'lower'} is "
                           f"better); the rule needs at least {need:.4g}")
    if pr.require_significance:
        n_fam = len(set(family) | {variant})
        desc.append(f"adjusted p < {rules.alpha:g}" + (f" ({rules.correction} across {n_fam} prompt variants)"
                                                        if n_fam > 1 else ""))
        _significance(chk, results, rules, baseline, candidate, variant, family, gib)
    chk.rule = ", ".join(desc)
    return chk


def _significance(chk: Check, results: dict, rules: GateRules, baseline: str, candidate: str,
                  variant: str | None, family: Sequence[str], gib: bool) -> None:
    """The "not luck" half: the eval's p (already corrected per metric across its pairs), corrected again across
    the variants the gate picked from, must be < alpha with the difference pointing the right way."""
    own = chk.p_adjusted if chk.p_adjusted is not None else chk.p_value
    p = _family_p(results, chk.metric, baseline, candidate, variant, family, own, rules.correction)
    chk.p_adjusted = p
    sign = 1.0 if gib else -1.0
    if p < rules.alpha and sign * chk.difference > 0:
        return
    chk.status = FAIL
    why = ("no difference: the candidate scores exactly what the champion scores" if chk.difference == 0
           else f"difference {chk.difference:+.4g} is in the wrong direction" if sign * chk.difference < 0
           else f"not significant: adjusted p = {p:.3g} >= {rules.alpha:g}")
    chk.reasons.append(f"{chk.metric}: {why}")


def _guardrail_check(results: dict, g: GuardrailRule, rules: GateRules, baseline: str, candidate: str,
                     variant: str | None) -> Check:
    chk, gib = _read_check(results, g, "guardrail", rules, baseline, candidate, variant)
    if chk.status == ERROR:
        return chk
    margin = max(g.margin, (g.relative_margin or 0.0) * abs(chk.baseline))
    # Worst plausible change in the good direction: the CI end on the bad side.
    worst = chk.ci_low if gib else -chk.ci_high
    chk.rule = (f"non-inferior within {margin:.4g} ({'higher' if gib else 'lower'} is better; "
                f"{100 * (1 - rules.alpha):g}% CI of the difference)")
    if worst < -margin:
        chk.status = FAIL
        chk.reasons.append(f"{g.metric}: may have got worse by up to {-worst:.4g} (CI {chk.ci_low:+.4g} .. "
                           f"{chk.ci_high:+.4g}), more than the margin {margin:.4g}")
    return chk


def _ab_check(ab_verdict: str | None) -> Check:
    chk = Check(metric="ab verdict", role="ab", status=PASS, rule="latest `flywheel ab` verdict is ship")
    if ab_verdict is None:
        chk.status = ERROR
        chk.reasons.append("a recent `flywheel ab` verdict is required and none was found")
    elif ab_verdict.lower() != "ship":
        chk.status = FAIL
        chk.reasons.append(f"the latest `flywheel ab` verdict is {ab_verdict!r}, not 'ship'")
    return chk


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


def _decide(checks: list[Check], reasons: list[str], variant: str | None, family: Sequence[str] = ()) -> dict:
    statuses = {c.status for c in checks}
    decision = ERROR if ERROR in statuses or not checks else FAIL if FAIL in statuses else PASS
    if decision == PASS:
        reasons = []
    return {"decision": decision, "exit_code": EXIT_CODES[decision], "variant": variant,
            "variant_family": sorted(set(family) | ({variant} if family and variant else set())),
            "checks": [asdict(c) for c in checks], "reasons": list(dict.fromkeys(reasons))}


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return format(x, spec) if math.isfinite(x) else str(x)
    return str(x)


def report_markdown(gate: dict, *, baseline_label: str, candidate_label: str, title: str = "Flywheel gate") -> str:
    """`gate_report.md`: short enough for a PR comment, complete enough to audit the decision. Labels, metric
    names and reasons carry user data (a candidate URI, a config): escaped, so they cannot add markup."""
    icon = {PASS: "PASS", FAIL: "FAIL", ERROR: "ERROR"}[gate["decision"]]
    lines = [f"## {title}: **{icon}** (exit {gate['exit_code']})", "",
             f"- champion / baseline: {md.code(baseline_label)}", f"- candidate: {md.code(candidate_label)}"]
    if gate.get("variant"):
        picked = [v for v in gate.get("variant_family") or [] if v != gate["variant"]]
        lines.append(f"- prompt variant: {md.code(gate['variant'])}" + (
            f" (best of {len(picked) + 1}; significance corrected across them)" if picked else ""))
    for k in ("eval_run_id", "gate_run_id"):
        if gate.get(k):
            lines.append(f"- {k.replace('_', ' ')}: {md.code(gate[k])}")
    lines += ["", "| check | metric | champion | candidate | difference | CI | p (adj.) | n | rule | result |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in gate["checks"]:
        ci = f"{_fmt(c['ci_low'], '+.4g')} .. {_fmt(c['ci_high'], '+.4g')}" if c["ci_low"] is not None else "–"
        p = f"{_fmt(c['p_value'], '.3g')} ({_fmt(c['p_adjusted'], '.3g')})" if c["p_value"] is not None else "–"
        rule = md.text(c["rule"] or "–")
        lines.append(f"| {md.text(c['role'])} | {md.text(c['metric'])} | {_fmt(c['baseline'])} | "
                     f"{_fmt(c['candidate'])} | "
                     f"{_fmt(c['difference'], '+.4g')} | {ci} | {p} | {_fmt(c['n'])} | {rule} | "
                     f"{c['status'].upper()} |")
    if gate["reasons"]:
        lines += ["", "Reasons:"] + [f"- {md.text(r)}" for r in gate["reasons"]]
    return "\n".join(lines) + "\n"


def decision_metrics(gate: dict) -> dict[str, Any]:
    """The numbers a gate run logs: its exit code and the primary check's baseline, candidate, difference and
    corrected p (None where the check never got that far)."""
    primary = gate["checks"][0] if gate["checks"] else {}
    return {"exit_code": gate["exit_code"], "primary.baseline": primary.get("baseline"),
            "primary.candidate": primary.get("candidate"), "primary.difference": primary.get("difference"),
            "primary.p_adjusted": primary.get("p_adjusted")}


# -- the gate stage's evidence and decision (plain data; the shell resolves models and logs the run) ------------

ROOT = Path(__file__).resolve().parents[1]  # the Flywheel checkout: prompt sources may be relative to it


@dataclass
class Evidence:
    """What the gate found before deciding, filled in as it is found: a crash part-way keeps what was already
    known (the candidate, the champion version) for the decision and its report."""

    candidate_label: str
    baseline_target: str
    candidate_target: str
    baseline_label: str = "?"
    problems: list[str] = field(default_factory=list)
    results: Optional[dict] = None
    eval_run_id: Optional[str] = None
    sample_run_id: Optional[str] = None
    cand: Any = None
    champ_version: Optional[str] = None


def default_baseline_target(results: dict, candidate_target: str) -> str:
    names = [t.get("name") if isinstance(t, dict) else t for t in results.get("targets") or []]
    if "champion" in names:
        return "champion"
    return next((n for n in names if n and n != candidate_target), "champion")


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


def shipped_variant(results: dict | None, variant: str | None, primary_metric: str,
                    candidate_target: str) -> tuple[str | None, list[str], str | None]:
    """(variant, the family it was picked from, its system prompt). The gate picks when no variant is fixed,
    and then corrects for the choice."""
    family: list[str] = []
    if results is not None and variant is None:
        variant, family = pick_variant(results, primary_metric, candidate_target)
    system_prompt = None
    if results is not None:
        try:
            system_prompt = system_prompt_for(results, variant)
        except FlywheelError:
            system_prompt = None
    return variant, family, system_prompt


def candidate_dataset(path: str | None, meta: dict, label: str) -> str:
    """`eval.cases: candidate`: the mined dataset dir `path` (from the candidate's lineage), only while it still
    holds the version the candidate was trained on."""
    from flywheel.mining.dataset import open_dataset

    if not path:
        raise InputError(f"eval.cases=candidate: {label} records no mined dataset that can be found "
                         "(flywheel_adapter.json: mine_run_id / dataset_version); set eval.cases=<dir or file>")
    try:
        ds = open_dataset(path)
    except InputError:
        ds = None
    if ds is None or ds.manifest is None:
        raise InputError(f"eval.cases=candidate: {Path(path) / 'manifest.json'}: missing or unreadable (the "
                         "candidate's dataset)")
    found = ds.version
    if meta.get("dataset_version") and found != meta["dataset_version"]:
        raise InputError(f"eval.cases=candidate: {path} holds dataset version {found}, not {meta['dataset_version']} "
                         "that the candidate was trained on (re-mined since?); set eval.cases")
    return str(path)


def decision_report(gate: dict, ev: Evidence, model_name: str) -> str:
    """gate_report.md: the rules' report, plus the promotion when there was one."""
    report = report_markdown(gate, baseline_label=ev.baseline_label, candidate_label=ev.candidate_label)
    promoted = gate["promoted_version"]
    if promoted:
        report += f"\nPromoted: {md.code(f'models:/{model_name}/{promoted}')} is now `@champion`.\n"
    return report
