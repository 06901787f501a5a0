"""The analysis engine end to end: demo logs, bad input, verdict rules, and real data checked by hand.

"By hand" = recomputed here from the raw rows with scipy/statsmodels, independently of the engine's aggregate
path (histograms, bincount moments).
"""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from flywheel.evals.ab.data import load_table
from flywheel.evals.ab.config import AbConfig, MetricConfig
from flywheel.evals.ab.engine import analyze
from flywheel.foundation.errors import InputError
from tests.conftest import shared_path

DEMO_METRICS = [
    MetricConfig(name="rating", kind="ordinal", min=1, max=5),
    MetricConfig(name="success", column="rating", kind="rate", threshold=4, min=1, max=5),
    MetricConfig(name="latency_ms", kind="mean", guardrail=True, higher_is_better=False, margin=0.10, min=0),
    MetricConfig(name="tokens", kind="mean", guardrail=True, higher_is_better=False, margin=0.10, min=0),
]


def C(report, variant, metric):
    return next(c for c in report["comparisons"] if c["variant"] == variant and c["metric"] == metric)


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    from flywheel.mining.demo_logs import write_demo_logs

    path = tmp_path_factory.mktemp("ab") / "logs.jsonl"
    write_demo_logs(path, n=400, seed=0)
    df, probs = load_table([path], ["user_id", "prompt_variant", "rating", "latency_ms", "tokens"])
    rep = analyze(df, AbConfig(metrics=DEMO_METRICS, control="v1", variants=["v1", "v2"]), problems=probs)
    return path, rep


def test_demo_logs_report(demo_report):
    path, rep = demo_report
    n_lines = sum(1 for line in open(path, "rb") if line.strip())
    assert rep["rows"]["read"] == n_lines
    assert rep["rows"]["by_reason"]["invalid_json"] >= 1                      # malformed lines counted
    assert rep["rows"]["by_reason"]["rating: missing or non-numeric"] == 1     # rating "five"
    assert rep["rows"]["by_reason"]["rating: out of range [1.0, 5.0]"] == 1        # rating 11
    assert any(":" in e for e in rep["rows"]["examples"]["invalid_json"])      # file:line given
    assert set(rep["srm"]) >= {"p_value", "status"} and rep["srm"]["status"] == "ok"
    for c in rep["comparisons"]:
        assert {"variant", "control", "metric", "test", "estimate", "ci_low", "ci_high", "p_value",
                "p_adjusted"} <= set(c)
    r = C(rep, "v2", "rating")
    assert r["test"] == "mann_whitney" and r["estimate"] > 0.3 and r["p_adjusted"] < 0.05
    assert C(rep, "v2", "success")["estimate"] > 0
    # the demo's v2 is slower and longer (planted): the latency guardrail must catch it
    lat = C(rep, "v2", "latency_ms")
    assert lat["role"] == "guardrail" and lat["guardrail_status"] == "fail"
    v = rep["verdicts"]["v2"]
    assert v["decision"] == "don't ship" and any("latency_ms" in r for r in v["reasons"])
    json.dumps(rep, allow_nan=False)  # JSON-safe


def test_demo_numbers_by_hand(demo_report):
    """Unit-level means recomputed with pandas + scipy on the raw rows."""
    path, rep = demo_report
    rows = []
    for line in open(path, "rb"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    df = pd.DataFrame([r for r in rows if isinstance(r, dict)])
    df = df[pd.to_numeric(df["rating"], errors="coerce").between(1, 5)]
    df["rating"] = df["rating"].astype(float)
    per_user = df.groupby(["user_id", "prompt_variant"])["rating"].mean().reset_index()
    c = per_user.loc[per_user.prompt_variant == "v1", "rating"].to_numpy()
    t = per_user.loc[per_user.prompt_variant == "v2", "rating"].to_numpy()
    r = C(rep, "v2", "rating")
    assert (r["n_control"], r["n_treatment"]) == (len(c), len(t))
    assert r["estimate"] == pytest.approx(t.mean() - c.mean(), abs=1e-12)
    assert r["p_value"] == pytest.approx(stats.mannwhitneyu(t, c, method="asymptotic").pvalue, abs=1e-9)
    ci = stats.ttest_ind(t, c, equal_var=False).confidence_interval(0.95)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
    prim = [x for x in rep["comparisons"] if x["role"] != "guardrail"]
    assert [x["p_adjusted"] for x in prim] == pytest.approx(
        list(multipletests([x["p_value"] for x in prim], method="holm")[1]), abs=1e-12)


def _frame(n_c, n_t, *, effect=0.0, seed=0, latency_effect=0.0):
    rng = np.random.default_rng(seed)
    v = np.array(["a"] * n_c + ["b"] * n_t)
    rating = np.clip(np.round(rng.normal(3.4, 1.0, n_c + n_t) + effect * (v == "b")), 1, 5)
    lat = rng.normal(1000, 100, n_c + n_t) + latency_effect * (v == "b")
    return pd.DataFrame({"user_id": np.arange(n_c + n_t), "prompt_variant": v, "rating": rating, "latency_ms": lat})


METRICS2 = [MetricConfig(name="rating", kind="ordinal", min=1, max=5),
            MetricConfig(name="latency_ms", kind="mean", guardrail=True, higher_is_better=False,
                         margin=0.05)]


def test_verdict_ship_keep_running_dont_ship():
    s = AbConfig(metrics=METRICS2, control="a")
    ship = analyze(_frame(3000, 3000, effect=0.3), s)
    assert ship["verdicts"]["b"]["decision"] == "ship"
    early = analyze(_frame(40, 40, effect=0.0, seed=3), s)
    v = early["verdicts"]["b"]
    assert v["decision"] == "keep running" and v["sample_still_needed_per_arm"] > 100
    flat = analyze(_frame(6000, 6000, effect=0.0, seed=4), s)
    assert flat["verdicts"]["b"]["decision"] == "don't ship"
    worse = analyze(_frame(3000, 3000, effect=0.3, latency_effect=200), s)
    assert worse["verdicts"]["b"]["decision"] == "don't ship"


def test_srm_alert_blocks_ship():
    # 50/50 configured, 52/48 observed at n = 20000
    df = _frame(10400, 9600, effect=0.3)
    rep = analyze(df, AbConfig(metrics=METRICS2, control="a", allocation={"a": 0.5, "b": 0.5}))
    assert rep["srm"]["status"] == "alert" and rep["srm"]["p_value"] < 1e-3
    assert rep["verdicts"]["b"]["decision"] == "invalid"
    assert "sample-ratio mismatch" in rep["verdicts"]["b"]["reasons"][0]


def test_units_collapsed_and_contamination_counted():
    df = pd.DataFrame({
        "user_id": ["u1", "u1", "u1", "u2", "u3", "u4", "u4", "u5", "u6", "u6"],
        "prompt_variant": ["a", "a", "a", "a", "b", "b", "b", "b", "a", "b"],
        "rating": [5, 5, 2, 3, 4, 2, 4, 5, 1, 5],
    })
    rep = analyze(df, AbConfig(metrics=[MetricConfig(name="rating", kind="mean")], control="a",
                                sequential={"enabled": False}))
    assert rep["rows"]["by_reason"] == {"unit_in_multiple_variants": 2}
    assert rep["units"] == {"a": 2, "b": 3}
    r = C(rep, "b", "rating")
    assert r["mean_control"] == pytest.approx((4 + 3) / 2)  # u1's three rows count once (mean 4)
    assert r["mean_treatment"] == pytest.approx((4 + 3 + 5) / 3)


def test_bad_input_messages():
    df = _frame(50, 50)
    with pytest.raises(InputError, match="control variant 'zzz' has no usable data; variants with data"):
        analyze(df, AbConfig(metrics=METRICS2, control="zzz"))
    with pytest.raises(InputError, match="only one variant"):
        analyze(df[df.prompt_variant == "a"], AbConfig(metrics=METRICS2, control="a"))
    with pytest.raises(InputError, match="column 'nope' not found"):
        analyze(df, AbConfig(metrics=[MetricConfig(name="x", column="nope")], control="a"))
    with pytest.raises(InputError, match="variant column"):
        analyze(df, AbConfig(metrics=METRICS2, variant="arm", control="a"))
    # unknown variant names: counted, not analysed
    df2 = df.copy()
    df2.loc[:4, "prompt_variant"] = "typo"
    rep = analyze(df2, AbConfig(metrics=METRICS2, control="a", variants=["a", "b"]))
    assert rep["rows"]["by_reason"]["unknown_variant"] == 5 and rep["variants"] == ["a", "b"]
    # NaN / non-numeric / out-of-range outcomes: excluded from that metric only, counted with locations
    df3 = df.copy().astype({"rating": object})
    df3.loc[0, "rating"], df3.loc[1, "rating"], df3.loc[2, "rating"] = float("nan"), "great", 9
    rep = analyze(df3, AbConfig(metrics=METRICS2, control="a"))
    assert rep["rows"]["by_reason"]["rating: missing or non-numeric"] == 2
    assert rep["rows"]["by_reason"]["rating: out of range [1.0, 5.0]"] == 1
    assert C(rep, "b", "rating")["n_control"] == 47 and C(rep, "b", "latency_ms")["n_control"] == 50


def test_zero_variance_is_reported():
    df = pd.DataFrame({"user_id": range(20), "prompt_variant": ["a", "b"] * 10, "rating": [4] * 20})
    rep = analyze(df, AbConfig(metrics=[MetricConfig(name="rating", kind="mean")], control="a"))
    c = C(rep, "b", "rating")
    assert "zero variance" in c["warning"] and c["p_value"] == 1.0


def test_cuped_in_engine_narrows_ci():
    rng = np.random.default_rng(8)
    n = 4000
    pre = rng.normal(3, 1, n)
    v = np.where(np.arange(n) % 2, "b", "a")
    y = 0.9 * pre + rng.normal(0, 0.5, n) + 0.05 * (v == "b")
    df = pd.DataFrame({"user_id": range(n), "prompt_variant": v, "y": y, "pre": pre})
    plain = C(analyze(df, AbConfig(metrics=[MetricConfig(name="y", kind="mean")], control="a")), "b", "y")
    cuped = [MetricConfig(name="y", kind="mean", covariate="pre")]
    cup = C(analyze(df, AbConfig(metrics=cuped, control="a")), "b", "y")
    assert cup["cuped"]["variance_reduction"] > 0.6
    assert (cup["ci_high"] - cup["ci_low"]) < 0.6 * (plain["ci_high"] - plain["ci_low"])


# --------------------------------------------------------------------------------------------- real data
def test_topicalchat_paired_by_hand():
    path = shared_path("usr-topicalchat-human-ratings", "topical_chat.json")
    df, probs = load_table([path], ["source", "system_id", "scores.overall"])
    rep = analyze(df, AbConfig(metrics=[MetricConfig(name="overall", column="scores.overall")], variant="system_id",
                               unit="source", paired=True, control="Original Ground Truth"), problems=probs)
    raw = pd.DataFrame([{"source": r["source"], "v": r["system_id"], "y": r["scores"]["overall"]}
                        for r in json.load(open(path))])
    wide = raw.pivot_table(index="source", columns="v", values="y")
    assert rep["design"] == "paired" and rep["srm"]["status"] == "ok"
    ctrl = wide["Original Ground Truth"]
    pv = []
    for v in rep["variants"][1:]:
        r = C(rep, v, "overall")
        assert r["test"] == "wilcoxon_signed_rank" and r["n"] == len(wide)
        # zero differences kept in the ranking (zsplit), the project's one signed-rank convention
        assert r["p_value"] == pytest.approx(stats.wilcoxon(wide[v] - ctrl, zero_method="zsplit").pvalue, abs=1e-12)
        ci = stats.ttest_rel(wide[v], ctrl).confidence_interval(0.95)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
        assert r["estimate"] == pytest.approx((wide[v] - ctrl).mean(), abs=1e-12)
        pv.append(r["p_value"])
    assert [C(rep, v, "overall")["p_adjusted"] for v in rep["variants"][1:]] == pytest.approx(
        list(multipletests(pv, method="holm")[1]), abs=1e-12)
    # the human-written new reply beats the original; every decoding variant is worse
    assert rep["verdicts"]["New Human Generated"]["decision"] == "ship"
    assert all(rep["verdicts"][v]["decision"] == "don't ship" for v in rep["variants"] if "Decoding" in v)


def test_persuasion_prompt_types_by_hand():
    path = shared_path("anthropic-persuasion-vegan-subset", "persuasion.csv")
    df, probs = load_table([path], ["ID", "prompt_type", "persuasiveness_metric", "rating_final", "rating_initial"])
    metrics = [MetricConfig(name="persuasiveness", column="persuasiveness_metric"),
               MetricConfig(name="final", column="rating_final", min=1, max=7, covariate="rating_initial")]
    rep = analyze(df, AbConfig(metrics=metrics, variant="prompt_type", unit="ID", control="Compelling Case"))
    raw = pd.read_csv(path)
    assert rep["rows"]["by_reason"] == {"missing_variant": int(raw.prompt_type.isna().sum())}  # human-written
    # examples point at the file line where the record starts, although arguments span many lines
    ex = rep["rows"]["examples"]["missing_variant"][0]
    line_no = int(ex.split(":")[1])
    first_na_id = raw.loc[raw.prompt_type.isna(), "ID"].iloc[0]
    assert open(path, encoding="utf-8").read().split("\n")[line_no - 1].startswith(first_na_id + ",")
    ctrl = raw.loc[raw.prompt_type == "Compelling Case", "persuasiveness_metric"]
    for v in ("Deceptive", "Expert Writer Rhetorics", "Logical Reasoning"):
        t = raw.loc[raw.prompt_type == v, "persuasiveness_metric"]
        r = C(rep, v, "persuasiveness")
        assert r["test"] == "mann_whitney"
        assert r["p_value"] == pytest.approx(stats.mannwhitneyu(t, ctrl, method="asymptotic").pvalue, abs=1e-9)
        ci = stats.ttest_ind(t, ctrl, equal_var=False).confidence_interval(0.95)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
        # labelled ratings "7 - Strongly support" parsed to 7; CUPED on the initial rating, recomputed here
        lead = raw.assign(f=raw.rating_final.str.split(" - ").str[0].astype(float),
                          i=raw.rating_initial.str.split(" - ").str[0].astype(float))
        lead = lead[lead.prompt_type.notna()]
        theta = np.cov(lead.i, lead.f)[0, 1] / np.var(lead.i, ddof=1)
        adj = lead.f - theta * (lead.i - lead.i.mean())
        ref = stats.ttest_ind(adj[lead.prompt_type == v], adj[lead.prompt_type == "Compelling Case"],
                              equal_var=False)
        f = C(rep, v, "final")
        assert f["cuped"]["theta"] == pytest.approx(theta, abs=1e-9)
        assert f["p_value"] == pytest.approx(ref.pvalue, abs=1e-9)
    assert all(d["decision"] == "keep running" for d in rep["verdicts"].values())  # 30 per arm: too few


def test_configured_variant_without_data_is_an_srm():
    df = _frame(500, 500)
    rep = analyze(df, AbConfig(metrics=METRICS2, control="a", variants=["a", "b", "c"]))
    assert rep["srm"]["observed"]["c"] == 0 and rep["srm"]["status"] == "alert"
    assert any("'c' has no usable data" in w for w in rep["warnings"])
    assert rep["verdicts"]["b"]["decision"] == "invalid"


def test_small_rate_uses_fisher_exact():
    df = pd.DataFrame({"user_id": range(24), "prompt_variant": ["a"] * 12 + ["b"] * 12,
                       "ok": [1] + [0] * 11 + [1] * 6 + [0] * 6})
    rep = analyze(df, AbConfig(metrics=[MetricConfig(name="ok")], control="a"))
    c = C(rep, "b", "ok")
    assert c["kind"] == "rate" and c["test"] == "fisher_exact"
    assert c["p_value"] == pytest.approx(stats.fisher_exact([[6, 6], [1, 11]]).pvalue, abs=1e-12)


def test_sequential_decision_is_more_conservative():
    df = _frame(400, 400, effect=0.25, seed=21)
    fixed = analyze(df, AbConfig(metrics=METRICS2[:1], control="a"))
    seq = analyze(df, AbConfig(metrics=METRICS2[:1], control="a", decision="sequential"))
    c = C(seq, "b", "rating")
    assert c["sequential"]["p_value"] >= c["welch_p_value"] or c["sequential"]["p_value"] >= c["p_value"]
    assert c["sequential"]["ci_low"] <= c["ci_low"] and c["sequential"]["ci_high"] >= c["ci_high"]
    assert seq["verdicts"]["b"]["basis"].startswith("always-valid")
    assert fixed["verdicts"]["b"]["basis"].startswith("fixed")


def test_guardrail_without_data_in_one_arm_blocks_ship():
    """A guardrail that cannot be evaluated must not vanish from the verdict: 'ship' needs it shown non-inferior."""
    s = AbConfig(metrics=METRICS2, control="a")
    for arm in ("b", "a"):
        df = _frame(3000, 3000, effect=0.3)
        df.loc[df.prompt_variant == arm, "latency_ms"] = np.nan
        rep = analyze(df, s)
        v = rep["verdicts"]["b"]
        assert v["decision"] == "invalid", (arm, v)
        assert any("guardrail latency_ms cannot be evaluated" in r and f"{arm} has 0 units" in r
                   for r in v["reasons"])
        assert rep["not_evaluated"] == [{"variant": "b", "metric": "latency_ms", "role": "guardrail",
                                         "reason": rep["not_evaluated"][0]["reason"]}]
        assert any("latency_ms (guardrail) not evaluated" in w for w in rep["warnings"])
        json.dumps(rep, allow_nan=False)
    # one usable unit is as blind as none
    df = _frame(3000, 3000, effect=0.3)
    df.loc[(df.prompt_variant == "b") & (df.user_id != 5000), "latency_ms"] = np.nan
    assert analyze(df, s)["verdicts"]["b"]["decision"] == "invalid"


def test_primary_without_data_in_one_arm_is_invalid_with_reason():
    df = _frame(300, 300, effect=0.3)
    df.loc[df.prompt_variant == "b", "rating"] = np.nan
    v = analyze(df, AbConfig(metrics=METRICS2, control="a"))["verdicts"]["b"]
    assert v["decision"] == "invalid"
    assert v["reasons"] == ["primary metric rating cannot be evaluated: b has 0 units with usable rating values "
                            "(a test needs at least 2 per arm)"]


def test_paired_guardrail_without_data_blocks_ship():
    rng = np.random.default_rng(1)
    items = np.repeat(np.arange(400), 2)
    arm = np.tile(["a", "b"], 400)
    score = rng.normal(3, 1, 800) + 0.5 * (arm == "b")
    lat = np.where(arm == "b", np.nan, rng.normal(1000, 50, 800))
    df = pd.DataFrame({"item": items, "arm": arm, "score": score, "lat": lat})
    metrics = [MetricConfig(name="score", kind="mean"),
               MetricConfig(name="lat", kind="mean", guardrail=True, higher_is_better=False, margin=0.1)]
    rep = analyze(df, AbConfig(metrics=metrics, variant="arm", unit="item", control="a", paired=True))
    assert rep["verdicts"]["b"]["decision"] == "invalid"
    assert "guardrail lat cannot be evaluated: 0 items" in rep["verdicts"]["b"]["reasons"][0]


def test_overflowing_values_are_named_not_tested():
    """Values near 1e308: sums overflow to inf. The report says so instead of a wrong reason or a 'ship'."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"user_id": range(200), "prompt_variant": ["a", "b"] * 100,
                       "x": rng.choice([0.5e308, 1e308, 1.5e308], 200)})
    rep = analyze(df, AbConfig(metrics=[MetricConfig(name="x", kind="mean")], control="a"))
    assert rep["comparisons"] == [] and rep["summaries"] == []
    (ne,) = rep["not_evaluated"]
    assert "overflows double precision in a, b" in ne["reason"]
    v = rep["verdicts"]["b"]
    assert v["decision"] == "invalid" and "primary metric x cannot be evaluated: the sum or variance" in v["reasons"][0]
    json.dumps(rep, allow_nan=False)


def test_units_in_both_variants_are_a_visible_warning():
    df = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u3", "u4", "u4", "u5", "u6"],
                       "prompt_variant": ["a", "b", "a", "a", "b", "a", "b", "b"],
                       "rating": [5, 5, 2, 3, 4, 2, 4, 5]})
    rep = analyze(df, AbConfig(metrics=[MetricConfig(name="rating", kind="mean")], control="a",
                                sequential={"enabled": False}))
    assert rep["units_in_multiple_variants"] == 2
    assert any(w.startswith("2 unit(s) appear in more than one variant (4 rows excluded)") for w in rep["warnings"])
    clean = analyze(_frame(20, 20), AbConfig(metrics=METRICS2, control="a"))
    assert clean["units_in_multiple_variants"] == 0 and not any("more than one variant" in w
                                                                 for w in clean["warnings"])


def test_zero_variance_verdicts_are_determinate():
    same = pd.DataFrame({"user_id": range(40), "prompt_variant": ["a", "b"] * 20, "rating": [4] * 40})
    v = analyze(same, AbConfig(metrics=[MetricConfig(name="rating", kind="mean")], control="a"))["verdicts"]["b"]
    assert v["decision"] == "don't ship" and v["sample_still_needed_per_arm"] == 0
    assert v["reasons"][0].startswith("no difference: rating is 4 for every unit in both arms (zero variance)")
    diff = same.assign(rating=np.where(same.prompt_variant == "b", 5, 4))
    rep = analyze(diff, AbConfig(metrics=[MetricConfig(name="rating", kind="mean")], control="a"))
    assert rep["verdicts"]["b"]["decision"] == "ship"
    assert "the difference is exact" in C(rep, "b", "rating")["warning"]


def test_empty_unit_column_is_one_clear_error():
    df = _frame(20, 20).assign(user_id=None)
    with pytest.raises(InputError, match="unit column 'user_id' is empty in every row .*--unit none"):
        analyze(df, AbConfig(metrics=METRICS2, control="a"))
