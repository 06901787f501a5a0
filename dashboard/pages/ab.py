"""A/B: per-variant metrics with CIs, lift, raw and adjusted p-values, the SRM badge, the sequential chart over
time, verdicts with reasons, and the Bayesian chance-to-beat shown apart from the p-values.

Reads `report.json` of a `flywheel ab analyze` run (the `--json` output). "Over time" comes from the runs
themselves: every analysis of the same experiment is one look, and the stage logs each comparison's estimate,
CI and always-valid (sequential) p-value as run metrics, so the looks are one search, not N artifact reads.
"""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from flywheel.dashboard import store, ui

SRM_BADGE = {"ok": ("green", "SRM ok"), "warning": ("orange", "SRM warning"), "alert": ("red", "SRM ALERT")}
VERDICT_COLOR = {"ship": "green", "don't ship": "red", "keep running": "blue", "invalid": "red"}

st.title("A/B tests")
runs = store.runs("ab", parents_only=True)
if not runs:
    ui.empty_state("A/B analyses", "flywheel ab analyze LOGS",
                   "`flywheel demo` analyses the prompt variants in its demo logs.")
    st.stop()

run = ui.pick_run(runs, "Analysis", key="ab_run")
report = store.artifact_json(run["run_id"], "report.json")
if not isinstance(report, dict):
    st.warning("This run has no `report.json` (did it finish?).")
    st.stop()
alpha = report.get("alpha", 0.05)
control = report.get("control", "control")


def flat(row: dict) -> dict:
    """Nested dicts of a comparison ({'bayesian': {...}, 'sequential': {...}}) become `outer.inner` columns."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


comparisons = pd.DataFrame([flat(c) for c in report.get("comparisons", []) if isinstance(c, dict)])
summaries = pd.DataFrame([s for s in report.get("summaries", []) if isinstance(s, dict)])

# ------------------------------------------------------------------------------------------- SRM + verdicts
srm = report.get("srm") or {}
status = str(srm.get("status", run["tags"].get("flywheel.ab.srm_status", "unknown"))).lower()
color, text = SRM_BADGE.get(status, ("gray", f"SRM {status}"))
observed = srm.get("observed") or {}
st.markdown(f":{color}-badge[{text}] &nbsp; sample-ratio mismatch χ² p = {ui.pvalue(srm.get('p_value'))}"
            + (f" · units {', '.join(f'{k} {v:,}' for k, v in observed.items())}" if observed else "")
            + (" — **an SRM alert blocks a ship verdict: the split itself is broken.**" if color == "red" else ""))
rows = report.get("rows") or {}
if rows:
    st.caption(f"design {report.get('design', '?')} · control **{control}** · rows read {rows.get('read', '?'):,}, "
               f"used {rows.get('used', '?'):,}, excluded {rows.get('excluded', 0):,}"
               + (f" ({', '.join(f'{k}: {v}' for k, v in rows.get('by_reason', {}).items())})"
                  if rows.get("by_reason") else ""))
for w in report.get("warnings") or []:
    st.warning(str(w))

verdicts = report.get("verdicts") or {}
if verdicts:
    st.subheader("Verdicts")
    cols = st.columns(min(len(verdicts), 3))
    for i, (variant, v) in enumerate(verdicts.items()):
        v = v if isinstance(v, dict) else {"decision": v}
        word = str(v.get("decision", v.get("verdict", "?")))
        with cols[i % len(cols)], st.container(border=True):
            st.markdown(f"**{variant}** vs {control} &nbsp; :{VERDICT_COLOR.get(word.lower(), 'gray')}-badge[{word}]")
            for reason in v.get("reasons") or []:
                st.caption(f"• {reason}")
            needed = v.get("sample_still_needed_per_arm")
            if word == "keep running" and needed:
                st.caption(f"about **{ui.num(needed)}** more units per arm")
            if v.get("basis"):
                st.caption(f"decided on {v['basis']}")

if comparisons.empty:
    st.caption("The report has no comparisons.")
    st.stop()

# ------------------------------------------------------------------------------------------- per metric
st.subheader("Variants against control")
metric = st.selectbox("Metric", list(dict.fromkeys(comparisons["metric"])), key="ab_metric")
part = comparisons[comparisons["metric"] == metric].reset_index(drop=True)
left, right = st.columns(2)
with left:
    if not summaries.empty and {"variant", "mean", "metric"} <= set(summaries.columns):
        arms = summaries[summaries["metric"] == metric].reset_index(drop=True)
        fig = px.scatter(arms, x="variant", y="mean", title=f"{metric}: mean by variant, {1 - alpha:.0%} CI",
                         error_y=arms["ci_high"] - arms["mean"] if "ci_high" in arms else None,
                         error_y_minus=arms["mean"] - arms["ci_low"] if "ci_low" in arms else None,
                         hover_data=[c for c in ("n", "sd") if c in arms])
        fig.update_traces(marker=dict(size=13))
        fig.update_layout(height=330, margin=dict(l=10, r=10, t=50, b=10))
        st.plotly_chart(fig, width="stretch")
with right:
    # The difference to control with its CI: a reviewer's question is "is it clear of zero?".
    fig = px.scatter(part, x="variant", y="estimate", title=f"{metric}: difference vs {control}, {1 - alpha:.0%} CI",
                     error_y=part["ci_high"] - part["estimate"], error_y_minus=part["estimate"] - part["ci_low"])
    fig.add_hline(y=0, line_dash="dot")
    fig.update_traces(marker=dict(size=13))
    fig.update_layout(height=330, margin=dict(l=10, r=10, t=50, b=10))
    st.plotly_chart(fig, width="stretch")

table = pd.DataFrame({
    "variant": part["variant"], "test": part.get("test"),
    "n control / variant": [f"{ui.num(a)} / {ui.num(b)}" for a, b in
                            zip(part.get("n_control", [None] * len(part)),
                                part.get("n_treatment", [None] * len(part)))],
    "mean control → variant": [f"{ui.num(a)} → {ui.num(b)}" for a, b in
                               zip(part.get("mean_control", [None] * len(part)),
                                   part.get("mean_treatment", [None] * len(part)))],
    "difference [CI]": [f"{ui.num(e)} [{ui.num(lo)}, {ui.num(hi)}]" for e, lo, hi in
                        zip(part["estimate"], part["ci_low"], part["ci_high"])],
    "lift [CI]": [f"{e:+.1%} [{lo:+.1%}, {hi:+.1%}]" if pd.notna(e) else "-" for e, lo, hi in
                  zip(part.get("relative_lift.estimate", pd.Series([None] * len(part))),
                      part.get("relative_lift.ci_low", pd.Series([None] * len(part))),
                      part.get("relative_lift.ci_high", pd.Series([None] * len(part))))],
    "p": part["p_value"].map(ui.pvalue) if "p_value" in part else "-",
    f"p adjusted ({report.get('correction', '?')})": part["p_adjusted"].map(ui.pvalue) if "p_adjusted" in part
    else "-",
    "p sequential": part["sequential.p_value"].map(ui.pvalue) if "sequential.p_value" in part else "-",
})
if "guardrail_status" in part:
    table["guardrail"] = part["guardrail_status"].fillna("")
st.markdown("**Frequentist tests** — raw and multiplicity-adjusted p-values")
st.dataframe(table, hide_index=True, width="stretch")

if "bayesian.chance_to_beat_control" in part:
    st.markdown("**Bayesian** — the posterior probability that the variant beats control. "
                "*This is not a p-value*, and it is not corrected for multiple comparisons.")
    bayes = pd.DataFrame({"variant": part["variant"],
                          "chance to beat control": part["bayesian.chance_to_beat_control"].map(
                              lambda x: "-" if pd.isna(x) else ">99.9%" if x > 0.999 else "<0.1%" if x < 0.001
                              else f"{float(x):.1%}"),
                          "expected loss": part.get("bayesian.expected_loss", pd.Series([None] * len(part))).map(
                              ui.num),
                          "model": part.get("bayesian.model", pd.Series([""] * len(part)))})
    st.dataframe(bayes, hide_index=True, width="stretch")

# ------------------------------------------------------------------------------------------- sequential
st.subheader("Sequential monitoring")
st.caption("Always-valid p-values and confidence sequences: looking after every batch does not inflate false "
           "positives, so each analysis below is a legitimate look.")
variant = st.selectbox("Variant", list(dict.fromkeys(part["variant"])), key="ab_seq_variant")
prefix = store.sanitize(f"{variant}.{metric}")
same = [r for r in runs if r["run_name"] == run["run_name"] and f"{prefix}.estimate" in r["metrics"]]
looks = pd.DataFrame([{"time": pd.Timestamp(r["start_time"], unit="ms", tz="UTC"),
                       "estimate": r["metrics"][f"{prefix}.estimate"],
                       "ci_low": r["metrics"].get(f"{prefix}.ci_low"), "ci_high": r["metrics"].get(f"{prefix}.ci_high"),
                       "p_value": r["metrics"].get(f"{prefix}.p_value"),
                       "p_sequential": r["metrics"].get(f"{prefix}.p_sequential")} for r in same]).sort_values("time") \
    if same else pd.DataFrame()
if len(looks) >= 2:
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=looks["time"], y=looks["p_sequential"], mode="lines+markers",
                             name="always-valid p (sequential)"))
    fig.add_trace(go.Scatter(x=looks["time"], y=looks["p_value"], mode="lines+markers", name="fixed-horizon p",
                             line=dict(dash="dot")))
    fig.add_hline(y=alpha, line_dash="dash", annotation_text=f"α = {alpha}")
    fig.update_layout(height=330, title=f"{variant} vs {control}, {metric}: p-values at each look ({len(looks)})",
                      yaxis_type="log", margin=dict(l=10, r=10, t=50, b=10))
    st.plotly_chart(fig, width="stretch")
else:
    st.caption(f"One look so far ({len(looks)} analysis of `{run['run_name']}`): re-run `flywheel ab analyze` as "
               "data arrives to see the sequence over time. Below: this look's fixed vs always-valid interval.")
row = part[part["variant"] == variant].iloc[0]
if pd.notna(row.get("sequential.ci_low")):
    fig = go.Figure()
    for name, lo, hi in (("fixed-horizon CI", row["ci_low"], row["ci_high"]),
                         ("confidence sequence (always valid)", row["sequential.ci_low"], row["sequential.ci_high"])):
        fig.add_trace(go.Scatter(x=[row["estimate"]], y=[name], mode="markers", marker=dict(size=12),
                                 error_x=dict(type="data", symmetric=False, array=[hi - row["estimate"]],
                                              arrayminus=[row["estimate"] - lo]), showlegend=False))
    fig.add_vline(x=0, line_dash="dot")
    fig.update_layout(height=200, margin=dict(l=10, r=10, t=10, b=10), xaxis_title=f"difference in {metric}")
    st.plotly_chart(fig, width="stretch")

with st.expander("Every comparison, all metrics and columns"):
    st.dataframe(comparisons, hide_index=True, width="stretch")
notes = report.get("notes") or {}
with st.expander("How to read these numbers (the stage's notes)"):
    for key, note in (notes.items() if isinstance(notes, dict) else enumerate(notes)):
        st.markdown(f"- **{key}**: {note}" if isinstance(notes, dict) else f"- {note}")

plots = [a for a in store.list_artifacts(run["run_id"]) if a["path"].startswith("ab_") and a["path"].endswith(".png")]
if plots:
    with st.expander(f"The stage's own plots ({len(plots)})"):
        for a in plots:
            data = store.artifact_bytes(run["run_id"], a["path"])
            if data:
                st.image(data, caption=a["path"])
