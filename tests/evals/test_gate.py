"""Gate rules over hand-written results.json: thresholds, significance, guardrails, and failing closed."""

from __future__ import annotations

import copy
import math

import pytest

from flywheel.evals import gate as g


def results(nll=(2.0, 1.6), nll_ci=(-0.5, -0.3), nll_p=0.001, rouge=(0.30, 0.31), rouge_ci=(-0.01, 0.03),
            n=40, variant="concise"):
    """Two targets (base, candidate), one variant; shaped like the eval stage's results.json."""
    def cell(target, metric, mean, direction):
        return {"variant": variant, "target": target, "metric": metric, "mean": mean, "ci_low": mean - 0.1,
                "ci_high": mean + 0.1, "n": n, "direction": direction}

    def comp(metric, est, ci, p, direction):
        return {"variant": f"candidate/{variant}", "control": f"champion/{variant}", "metric": metric,
                "test": "paired_t", "estimate": est, "ci_low": ci[0], "ci_high": ci[1], "p_value": p,
                "p_adjusted": p, "n": n, "control_target": "champion", "treatment_target": "candidate",
                "control_variant": variant, "treatment_variant": variant, "direction": direction}

    return {
        "cells": [cell("champion", "nll", nll[0], "lower"), cell("candidate", "nll", nll[1], "lower"),
                  cell("champion", "rouge_l", rouge[0], "higher"), cell("candidate", "rouge_l", rouge[1], "higher")],
        "comparisons": [comp("nll", nll[1] - nll[0], nll_ci, nll_p, "lower"),
                        comp("rouge_l", rouge[1] - rouge[0], rouge_ci, 0.4, "higher")],
    }


def rules(**kw):
    primary = kw.pop("primary", g.PrimaryRule(metric="nll", min_relative_change=0.05))
    guard = kw.pop("guardrails", [g.GuardrailRule(metric="rouge_l", margin=0.02)])
    return g.GateRules(primary=primary, guardrails=guard, min_cases=kw.pop("min_cases", 20), **kw)


def run(res, r=None, **kw):
    return g.evaluate(res, r or rules(), baseline="champion", candidate="candidate", **kw)


def test_clear_improvement_passes():
    out = run(results())
    assert out["decision"] == "pass" and out["exit_code"] == 0 and out["reasons"] == []
    primary = out["checks"][0]
    assert primary["difference"] == pytest.approx(-0.4) and primary["status"] == "pass"


def test_direction_comes_from_the_eval_stage_or_the_config():
    # Same numbers, but told greater is better: a lower NLL is now a regression.
    out = run(results(), rules(primary=g.PrimaryRule(metric="nll", greater_is_better=True, min_absolute_change=0.1)))
    assert out["decision"] == "fail"


@pytest.mark.parametrize("kw,expect", [
    ({"min_absolute_change": 0.39}, "pass"),
    ({"min_absolute_change": 0.41}, "fail"),
    ({"min_relative_change": 0.2}, "pass"),    # 0.4 / 2.0 = 20 % exactly: MLflow's >= passes
    ({"min_relative_change": 0.21}, "fail"),
    ({"threshold": 1.6}, "pass"),              # lower is better: candidate <= threshold
    ({"threshold": 1.5}, "fail"),
])
def test_metric_threshold_semantics(kw, expect):
    out = run(results(), rules(primary=g.PrimaryRule(metric="nll", **kw)))
    assert out["decision"] == expect, out["reasons"]


def test_zero_baseline_relative_rule_falls_back_to_strictly_better():
    res = results(nll=(0.0, 0.0), nll_ci=(-0.01, 0.01), nll_p=0.9)
    out = run(res, rules(primary=g.PrimaryRule(metric="nll", min_relative_change=0.1, require_significance=False)))
    assert out["decision"] == "fail" and "needs at least 1e-10" in out["reasons"][0]


def test_big_but_not_significant_fails():
    out = run(results(nll_ci=(-0.9, 0.1), nll_p=0.2))
    assert out["decision"] == "fail"
    assert any("not significant" in r for r in out["reasons"])


def test_significant_in_the_wrong_direction_fails():
    out = run(results(nll=(1.6, 2.0), nll_ci=(0.3, 0.5), nll_p=0.001),
              rules(primary=g.PrimaryRule(metric="nll")))
    assert out["decision"] == "fail" and any("wrong direction" in r for r in out["reasons"])


def test_a_fixed_variant_is_a_family_of_one_and_raw_p_is_used_when_eval_did_not_adjust():
    res = results(nll_p=0.03)
    del res["comparisons"][0]["p_adjusted"]
    out = run(res, rules(correction="bonferroni"))
    assert out["checks"][0]["p_adjusted"] == pytest.approx(0.03)  # nothing picked: nothing to correct for
    assert out["decision"] == "pass"


def three_variants(ps=(0.02, 0.5, 0.6), means=(1.6, 1.8, 1.9)):
    """The candidate evaluated with three prompt variants; `concise` is its best and significant on its own."""
    res = {"cells": [], "comparisons": []}
    for name, p, mean in zip(("concise", "grounded", "plain"), ps, means):
        one = results(nll=(2.0, mean), nll_ci=(mean - 2.0 - 0.1, mean - 2.0 + 0.1), nll_p=p, variant=name)
        res["cells"] += one["cells"]
        res["comparisons"] += one["comparisons"]
    return res


def test_picking_the_best_of_three_variants_is_corrected_across_all_three():
    res = three_variants()
    variant, family = g.pick_variant(res, "nll", "candidate")
    assert variant == "concise" and family == ["concise", "grounded", "plain"]
    alone = run(res, variant="concise")  # fixed in advance: p = 0.02 < 0.05
    assert alone["decision"] == "pass" and alone["checks"][0]["p_adjusted"] == pytest.approx(0.02)
    picked = run(res, variant=variant, variant_family=family)  # Holm over 3: 0.02 * 3 = 0.06
    assert picked["checks"][0]["p_adjusted"] == pytest.approx(0.06)
    assert picked["decision"] == "fail" and any("not significant: adjusted p = 0.06" in r for r in picked["reasons"])
    assert "holm across 3 prompt variants" in picked["checks"][0]["rule"]
    assert "best of 3" in g.report_markdown(picked, baseline_label="b", candidate_label="c")
    # Strong enough evidence survives the correction.
    assert run(three_variants(ps=(0.001, 0.5, 0.6)), variant=variant, variant_family=family)["decision"] == "pass"


def test_a_variant_without_a_comparison_still_counts_in_the_family():
    res = three_variants()
    res["comparisons"] = [c for c in res["comparisons"] if c["control_variant"] != "plain"]
    out = run(res, variant="concise", variant_family=["concise", "grounded", "plain"])
    assert out["checks"][0]["p_adjusted"] == pytest.approx(0.06)  # plain counts as p = 1, not as no test


def test_guardrail_non_inferiority():
    assert run(results(rouge_ci=(-0.019, 0.03)))["decision"] == "pass"
    out = run(results(rouge_ci=(-0.05, 0.03)))
    assert out["decision"] == "fail" and any("rouge_l: may have got worse" in r for r in out["reasons"])
    # relative margin: 20 % of a 0.30 baseline = 0.06 covers -0.05
    out = run(results(rouge_ci=(-0.05, 0.03)), rules(guardrails=[g.GuardrailRule(metric="rouge_l", relative_margin=0.2)]))
    assert out["decision"] == "pass"


@pytest.mark.parametrize("mutate,needle", [
    (lambda r: r["cells"][1].update(mean=float("nan")), "not a finite number"),
    (lambda r: r["comparisons"][0].update(p_value=None), "p_value missing"),
    (lambda r: r["comparisons"][0].update(ci_low=float("inf")), "ci_low"),
    (lambda r: r["comparisons"].pop(0), "no paired comparison"),
    (lambda r: r["cells"].pop(1), "no result for candidate"),
    (lambda r: [c.update(n=5) for c in r["comparisons"]], "fewer than the minimum 20"),
    (lambda r: r["comparisons"].pop(1), "rouge_l: no paired comparison"),
    # the primary metric's value missing (e.g. every generation of the candidate failed)
    (lambda r: r["cells"][1].update(mean=None, n=0), "candidate missing or not a finite number"),
    # failed generations in the primary cell: the survivors' mean is not evidence
    (lambda r: r["cells"][1].update(n_failed=3), "candidate candidate: 3 failed generations"),
    (lambda r: r["cells"][0].update(n_failed=1), "baseline champion: 1 failed generations"),
])
def test_fails_closed(mutate, needle):
    res = results()
    mutate(res)
    out = run(res)
    assert out["decision"] == "error" and out["exit_code"] == 2
    assert any(needle in r for r in out["reasons"]), out["reasons"]


def test_missing_results_and_upstream_problems_are_errors():
    assert run(None)["exit_code"] == 2
    out = run(results(), problems=["champion models:/x@champion unreadable"])
    assert out["decision"] == "error" and "champion" in out["reasons"][0]


def test_unknown_direction_is_an_error():
    res = results()
    for c in res["cells"]:
        c.pop("direction")
    out = run(res, rules(guardrails=[]))
    assert out["decision"] == "error" and "direction unknown" in out["reasons"][0]


def test_several_variants_need_a_choice():
    res = results()
    other = copy.deepcopy(results(variant="grounded"))
    res["cells"] += other["cells"]
    res["comparisons"] += other["comparisons"]
    assert run(res)["decision"] == "error"
    out = run(res, variant="grounded")
    assert out["decision"] == "pass" and out["variant"] == "grounded"


def test_ab_verdict_required():
    r = rules(ab=g.AbRule(require=True))
    assert run(results(), r, ab_verdict="ship")["decision"] == "pass"
    assert run(results(), r, ab_verdict="don't ship")["decision"] == "fail"
    assert run(results(), r)["decision"] == "error"


def test_one_default_for_min_relative_change():
    assert g.PrimaryRule().min_relative_change == g.GateConfig().primary.min_relative_change == 0.01
    assert isinstance(g.GateConfig(), g.GateRules)  # the gate's config is the rule set, not a copy of it


def test_label_only_comparisons_are_understood():
    res = results()
    for c in res["comparisons"]:
        for k in ("control_target", "treatment_target", "control_variant", "treatment_variant"):
            c.pop(k)
    assert run(res)["decision"] == "pass"


def test_report_markdown_lists_every_check():
    out = run(results(rouge_ci=(-0.05, 0.03)))
    md = g.report_markdown(out, baseline_label="base smollm2", candidate_label="runs:/abc/adapter")
    assert md.startswith("## Flywheel gate: **FAIL** (exit 1)")
    assert "| primary | nll | 2 | 1.6 | -0.4 |" in md and "| guardrail | rouge_l |" in md
    assert "Reasons:" in md and math.isfinite(out["checks"][0]["p_adjusted"])


def test_identity_check_names_what_was_evaluated_instead():
    from flywheel.evals.gate import check_identities

    cand, champ, base = "c" * 64, "d" * 64, "b" * 64
    res = {"targets": [{"name": "champion", "base_sha256": base, "adapter_sha256": champ},
                       {"name": "candidate", "base_sha256": base, "adapter_sha256": cand}]}
    kw = dict(baseline="champion", candidate="candidate", champion_label="models:/m@champion (v3)")
    assert check_identities(res, candidate_sha256=cand, champion_sha256=champ, **kw) == []
    assert "not the candidate being promoted" in check_identities(
        res, candidate_sha256="e" * 64, champion_sha256=champ, **kw)[0]
    moved = check_identities(res, candidate_sha256=cand, champion_sha256="f" * 64, **kw)
    assert moved == ["champion moved: results compare against adapter dddddddddddd…, but @champion is now "
                     "models:/m@champion (v3) (adapter ffffffffffff…)"]
    # No champion: only a comparison against the bare base model counts.
    assert check_identities(res, candidate_sha256=cand, champion_sha256=None, **kw)[0].startswith("champion moved")
    res["targets"][0]["adapter_sha256"] = None
    assert check_identities(res, candidate_sha256=cand, champion_sha256=None, **kw) == []
    assert "no adapter sha256" in check_identities({}, candidate_sha256=cand, champion_sha256=None, **kw)[0]


def test_default_baseline_is_the_champion_else_the_first_other_target():
    assert g.default_baseline_target({"targets": [{"name": "candidate"}, {"name": "champion"}]}, "candidate") \
        == "champion"
    assert g.default_baseline_target({"targets": [{"name": "candidate"}, {"name": "base"}]}, "candidate") == "base"
    assert g.default_baseline_target({}, "candidate") == "champion"  # nothing to read: the safe name


def test_shipped_variant_fixed_or_picked_and_its_system_prompt(tmp_path):
    res = results()
    tpl = tmp_path / "plain.yaml"
    tpl.write_text("name: plain\nversion: 1\nsystem: Answer {{ style }}.\nuser: '{{ question }}'\n"
                   "defaults: {style: briefly}\n")
    res["variants"] = [{"name": "plain", "source": str(tpl)}]
    assert g.shipped_variant(res, "plain", "nll", "candidate") == ("plain", [], "Answer briefly.")
    variant, family, _ = g.shipped_variant(res, None, "nll", "candidate")
    assert (variant, family) == g.pick_variant(res, "nll", "candidate")
    assert g.shipped_variant(None, None, "nll", "candidate") == (None, [], None)  # no evidence: nothing ships


def test_candidate_dataset_must_still_hold_the_trained_version(tmp_path):
    with pytest.raises(g.InputError, match="records no mined dataset"):
        g.candidate_dataset(None, {}, "runs:/abc")
    with pytest.raises(g.InputError, match="manifest.json: missing or unreadable"):
        g.candidate_dataset(str(tmp_path), {"dataset_version": "v1"}, "runs:/abc")
