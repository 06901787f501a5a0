"""The matrix runner on a scripted target (no model): rows, cells, CIs, comparisons, failures, early errors."""

from __future__ import annotations

import math

import pytest

from flywheel.evals.prompts import harness
from flywheel.evals.prompts.cases import Case
from flywheel.evals.prompts.generate import GenParams, Generation
from flywheel.foundation.cache import JsonCache
from flywheel.evals.prompts.templates import template_from_dict
from flywheel.foundation.errors import InputError

CONCISE = template_from_dict({"name": "concise", "version": 1, "system": "Be brief.", "user": "{{ question }}"})
GROUNDED = template_from_dict({"name": "grounded", "version": 2, "system": "Context: {{ context }}",
                               "user": "{{ question }}", "defaults": {"context": "(none)"}})


class ScriptedTarget:
    """Answers from a function of (messages, repeat); records every call so tests can see what was generated."""

    kind = "hf"

    def __init__(self, name, answer, nll=lambda msgs, ref: 1.0):
        self.name, self.answer, self._nll = name, answer, nll
        self.identity = f"scripted:{name}"
        self.calls = 0

    def check(self):
        pass

    def unload(self):
        pass

    def generate(self, prompts, params, cache, repeat=0, progress=None):
        out = []
        for m in prompts:
            self.calls += 1
            try:
                out.append(Generation(self.answer(m, repeat), 5, 10.0))
            except RuntimeError as e:
                out.append(Generation("", None, None, error=str(e)))
        return out

    def nll(self, prompts, refs, cache, **kw):
        return [self._nll(m, r) for m, r in zip(prompts, refs)]


def _cases(n=6):
    return [Case(id=f"c{i}", question=f"Protein in food {i}?", reference=f"Food {i} has {i} g protein.",
                 context=f"Food {i}: {i} g protein." if i % 2 else None,
                 assertions=[{"type": "icontains", "value": "protein"}], source=f"cases.jsonl:{i + 1}")
            for i in range(n)]


def _run(targets, cases=None, variants=(CONCISE, GROUNDED), tmp_path=None, **kw):
    kw.setdefault("metrics", ["exact_match", "rouge_l", "nll", "pii", "latency_ms", "generated_tokens"])
    return harness.run_matrix(cases or _cases(), list(variants), targets, params=GenParams(),
                              cache=JsonCache(tmp_path, enabled=False), **kw)


def test_matrix_rows_cells_and_comparisons(tmp_path):
    def base_nll(m, ref):
        i = int(ref.split()[1])
        return 2.0 + 0.1 * i + 0.01 * len(m[0]["content"]) + 0.05 * (i % 3)

    good = ScriptedTarget("base", lambda m, r: m[-1]["content"].replace("Protein in", "Lots of protein in"),
                          nll=base_nll)
    # The adapter is less surprised by the reference on every case, by a varying amount.
    better = ScriptedTarget("adapter", lambda m, r: "Food has protein: " + m[-1]["content"],
                            nll=lambda m, ref: base_nll(m, ref) - 0.3 - 0.02 * int(ref.split()[1]) ** 1.5)
    res = _run([good, better], cases=_cases(10), tmp_path=tmp_path)
    rows = res["rows"]
    assert len(rows) == 10 * 2 * 2
    assert {(r["variant"], r["target"]) for r in rows} == {(v, t) for v in ("concise", "grounded")
                                                           for t in ("base", "adapter")}
    cells = harness.cells(rows)
    nll = {(c["variant"], c["target"]): c for c in cells if c["metric"] == "nll"}
    assert set(nll) == {(v, t) for v in ("concise", "grounded") for t in ("base", "adapter")}
    assert all(c["n"] == 10 and c["direction"] == "lower" for c in nll.values())
    pr = {c["target"]: c for c in cells if c["metric"] == "pass_rate" and c["variant"] == "concise"}
    assert pr["base"]["mean"] == 1.0 and pr["base"]["ci_low"] < 1.0  # Wilson: not a zero-width interval

    pairs = harness.auto_pairs(["concise", "grounded"], ["base", "adapter"])
    assert pairs == [(("concise", "base"), ("grounded", "base")), (("concise", "adapter"), ("grounded", "adapter")),
                     (("concise", "base"), ("concise", "adapter")), (("grounded", "base"), ("grounded", "adapter"))]
    comps, notes = harness.compare(rows, pairs)
    keys = {"variant", "control", "metric", "test", "estimate", "ci_low", "ci_high", "p_value", "p_adjusted", "n"}
    assert all(keys <= set(c) for c in comps)
    adapter_nll = [c for c in comps if c["metric"] == "nll" and c["control_target"] == "base"
                   and c["treatment_target"] == "adapter"]
    assert len(adapter_nll) == 2
    for c in adapter_nll:
        assert c["control"] == f"base/{c['treatment_variant']}" and c["variant"] == f"adapter/{c['treatment_variant']}"
        assert c["estimate"] < 0 and c["outcome"] == "better" and c["n"] == 10
        assert c["p_adjusted"] >= c["p_value"]
    # Holm within the nll family: the largest adjusted p is >= every raw p of the family.
    fam = [c for c in comps if c["metric"] == "nll"]
    assert max(c["p_adjusted"] for c in fam) >= max(c["p_value"] for c in fam)


def test_generation_failure_is_a_failure_in_every_metric_never_a_score(tmp_path):
    def flaky(m, r):
        if "food 3" in m[-1]["content"]:
            raise RuntimeError("CUDA out of memory (pretend)")
        return "Protein: plenty."
    healthy = ScriptedTarget("healthy", lambda m, r: "Protein: plenty.")
    res = _run([healthy, ScriptedTarget("base", flaky)], variants=[CONCISE], tmp_path=tmp_path)
    rows = [r for r in res["rows"] if r["target"] == "base"]
    assert len(rows) == 6  # never dropped
    bad = next(r for r in rows if r["case_id"] == "c3")
    assert bad["error"].startswith("CUDA out of memory") and bad["failed"] is True
    assert bad["metrics"]["error_rate"] == 1.0
    # no zero that looks like a score: every other metric of the row has no value
    assert {k: v for k, v in bad["metrics"].items() if k != "error_rate"} == {
        k: None for k in bad["metrics"] if k != "error_rate"}
    assert {"pass_rate", "rouge_l", "exact_match", "nll"} <= set(bad["metrics"])
    assert bad["assertions"][0]["passed"] is None and "generation failed" in bad["assertions"][0]["reason"]
    cell = {c["metric"]: c for c in harness.cells(res["rows"]) if c["target"] == "base"}
    assert cell["error_rate"]["mean"] == pytest.approx(1 / 6) and cell["pass_rate"]["n"] == 5
    assert all(c["n_failed"] == 1 for c in cell.values()) and cell["rouge_l"]["n"] == 5
    assert harness.failures(res["rows"])["base/concise"]["failed"] == 1
    # the comparison leaves the failed pair out, and says so
    comps, notes = harness.compare(res["rows"], [(("concise", "healthy"), ("concise", "base"))])
    assert comps and all(c["n"] <= 5 and c["n_failed_pairs"] == 1 for c in comps)
    assert any("1 of 6 cases left out of every comparison (failed generation)" in n for n in notes)


def test_broken_template_fails_before_any_generation(tmp_path):
    broken = template_from_dict({"name": "broken", "version": 1, "user": "{{ question }} {{ audience }}"},
                                source="configs/prompts/broken.yaml")
    t = ScriptedTarget("base", lambda m, r: "x")
    with pytest.raises(InputError, match=r"broken\.yaml: template 'broken' names field 'audience'.*cases\.jsonl:1"):
        _run([t], variants=[CONCISE, broken], tmp_path=tmp_path)
    assert t.calls == 0


def test_assertion_needing_a_missing_field_fails_before_generation(tmp_path):
    cases = _cases(2)
    cases[1] = Case(id="noref", question="Q?", assertions=[{"type": "equals"}], source="cases.jsonl:9")
    t = ScriptedTarget("base", lambda m, r: "x")
    with pytest.raises(InputError, match=r"cases\.jsonl:9: assert\(equals\)"):
        _run([t], cases=cases, tmp_path=tmp_path)
    with pytest.raises(InputError, match="metrics: unknown 'bleu'"):
        _run([t], tmp_path=tmp_path, metrics=["bleu"])
    with pytest.raises(InputError, match="duplicate target name 'base'"):
        _run([t, ScriptedTarget("base", lambda m, r: "y")], tmp_path=tmp_path)
    assert t.calls == 0


def test_repeat_gives_consistency(tmp_path):
    t = ScriptedTarget("base", lambda m, r: "yes" if r < 2 or "food 0" in m[-1]["content"] else "no")
    res = harness.run_matrix(_cases(2), [CONCISE], [t], params=GenParams(do_sample=True), repeat=3,
                             cache=JsonCache(tmp_path, enabled=False), metrics=["exact_match"])
    cons = {r["case_id"]: r["metrics"]["consistency"] for r in res["rows"]}
    assert cons == {"c0": 1.0, "c1": pytest.approx(2 / 3)}
    assert all(len(r["outputs"]) == 3 for r in res["rows"])
    greedy = harness.run_matrix(_cases(1), [CONCISE], [t], params=GenParams(), repeat=2,
                                cache=JsonCache(tmp_path, enabled=False), metrics=["exact_match"])
    assert any("greedy" in n for n in greedy["notes"])


def test_judge_and_embedder_hooks(tmp_path):
    t = ScriptedTarget("base", lambda m, r: "Some protein.")
    res = _run([t], variants=[CONCISE], tmp_path=tmp_path, metrics=["embedding_similarity", "judge_score"],
               embedder=lambda outs, refs: [0.5] * len(outs), judge=lambda q, a, ref: 4.0)
    m = res["rows"][0]["metrics"]
    assert m["embedding_similarity"] == 0.5 and m["judge_score"] == 4.0
    skipped = _run([t], variants=[CONCISE], tmp_path=tmp_path, metrics=["judge_score"])
    assert any("judge_score skipped" in n for n in skipped["notes"])


def test_mean_ci_matches_libraries():
    from scipy import stats
    from statsmodels.stats.proportion import proportion_confint

    xs = [1.0, 2.0, 4.0, 7.0]
    mean, lo, hi = harness.mean_ci(xs, binary=False)
    ref = stats.t.interval(0.95, 3, loc=3.5, scale=stats.sem(xs))
    assert mean == 3.5 and (lo, hi) == pytest.approx(ref)
    mean, lo, hi = harness.mean_ci([1, 0, 1, 1], binary=True)
    assert (lo, hi) == pytest.approx(proportion_confint(3, 4, method="wilson"))
    assert harness.mean_ci([], binary=False) == (None, None, None)
    assert harness.mean_ci([2.0], binary=False) == (2.0, None, None)


def test_disk_cache_roundtrip_and_key(tmp_path):
    c = JsonCache(tmp_path)
    k = c.key("gen", "model", [{"role": "user", "content": "hi"}], GenParams().key(), 0)
    assert c.get("gen", k) is None
    c.put("gen", k, {"text": "hello"})
    assert c.get("gen", k) == {"text": "hello"} and (c.hits, c.misses) == (1, 1)
    # batch size does not change greedy outputs, so it is not part of the key; sampling params are
    assert GenParams(batch_size=2).key() == GenParams(batch_size=16).key()
    assert GenParams(do_sample=True, seed=1).key() != GenParams(do_sample=True, seed=2).key()
    assert not math.isnan(len(k))


def test_configured_pairs_become_compare_pairs_and_a_wrong_cell_is_named():
    pairs = [({"variant": "concise", "target": "base"}, {"variant": "grounded", "target": "base"})]
    assert harness.configured_pairs(pairs, ["concise", "grounded"], ["base"]) == [
        (("concise", "base"), ("grounded", "base"))]
    bad = pairs + [({"variant": "concise", "target": "base"}, {"variant": "concise", "target": "tuned"})]
    with pytest.raises(InputError, match=r"compare.pairs\[1\]: .*'tuned'.* names no cell"):
        harness.configured_pairs(bad, ["concise", "grounded"], ["base"])
