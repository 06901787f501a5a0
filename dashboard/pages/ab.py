"""A/B: per-variant metrics with CIs, lift, raw and adjusted p-values, the SRM badge, the sequential chart,
verdicts with reasons, and the Bayesian chance-to-beat shown apart from the p-values."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from dashboard import store, ui

BAYES = ("chance_to_beat", "chance_to_beat_control", "prob_beat_control", "p_beat_control", "p_beat",
         "probability_to_beat", "expected_loss")
SRM_BADGE = {"ok": ("green", "SRM ok"), "pass": ("green", "SRM ok"), "warning": ("orange", "SRM warning"),
             "warn": ("orange", "SRM warning"), "alert": ("red", "SRM ALERT"), "fail": ("red", "SRM ALERT")}
VERDICT_COLOR = {"ship": "green", "don't ship": "red", "dont_ship": "red", "do_not_ship": "red",
                 "keep running": "blue", "keep_running": "blue", "invalid": "red"}

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


def flat(row: dict) -> dict:
    """Nested dicts inside a comparison ({'bayes': {...}}) become `bayes.key` columns."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}" if kk not in BAYES else kk: vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


comparisons = pd.DataFrame([flat(c) for c in report.get("comparisons", []) if isinstance(c, dict)])

# ------------------------------------------------------------------------------------------- SRM + verdicts
srm = report.get("srm") or {}
status = str(srm.get("status", run["tags"].get("flywheel.ab.srm_status", "unknown"))).lower()
color, text = SRM_BADGE.get(status, ("gray", f"SRM {status}"))
st.markdown(f":{color}-badge[{text}] &nbsp; sample-ratio mismatch χ² p = {ui.pvalue(srm.get('p_value'))}"
            + (" — an SRM alert blocks a ship verdict: the split itself is broken." if color == "red" else ""))

verdicts = report.get("verdicts") or {}
if isinstance(verdicts, list):
    verdicts = {str(v.get("variant", i)): v for i, v in enumerate(verdicts) if isinstance(v, dict)}
if verdicts:
    st.subheader("Verdicts")
    cols = st.columns(min(len(verdicts), 4))
    for i, (variant, v) in enumerate(verdicts.items()):
        v = v if isinstance(v, dict) else {"verdict": v}
        word = str(v.get("verdict", v.get("decision", "?")))
        with cols[i % len(cols)]:
            with st.container(border=True):
                st.markdown(f"**{variant}** &nbsp; :{VERDICT_COLOR.get(word.lower(), 'gray')}-badge[{word}]")
                reasons = v.get("reasons") or v.get("reason") or []
                for reason in [reasons] if isinstance(reasons, str) else reasons:
                    st.caption(f"• {reason}")
                needed = v.get("sample_needed") or v.get("n_needed") or v.get("additional_units")
                if needed:
                    st.caption(f"sample still needed: {ui.num(needed)}")

if comparisons.empty:
    st.caption("The report has no comparisons.")
    st.stop()

# ------------------------------------------------------------------------------------------- per metric
st.subheader("Variants against control")
metrics = list(dict.fromkeys(comparisons["metric"])) if "metric" in comparisons.columns else [None]
metric = st.selectbox("Metric", metrics, key="ab_metric") if metrics != [None] else None
part = comparisons[comparisons["metric"] == metric] if metric is not None else comparisons

arms = pd.DataFrame([a for a in (report.get("arms") or report.get("variants") or report.get("summary") or [])
                     if isinstance(a, dict)])
left, right = st.columns(2)
with left:
    if not arms.empty and {"variant", "mean"} <= set(arms.columns):
        a = arms[arms["metric"] == metric] if "metric" in arms.columns and metric is not None else arms
        fig = px.scatter(a, x="variant", y="mean", title=f"{metric}: mean by variant (95 % CI)",
                         error_y=(a["ci_high"] - a["mean"]) if "ci_high" in a.columns else None,
                         error_y_minus=(a["mean"] - a["ci_low"]) if "ci_low" in a.columns else None)
        fig.update_traces(marker=dict(size=12))
    else:
        fig = go.Figure()
    # The difference to control with its CI: the reviewer's question is "is it above zero?".
    if {"variant", "estimate"} <= set(part.columns):
        fig2 = px.scatter(part, x="variant", y="estimate", title=f"{metric}: difference vs control (95 % CI)",
                          error_y=(part["ci_high"] - part["estimate"]) if "ci_high" in part.columns else None,
                          error_y_minus=(part["estimate"] - part["ci_low"]) if "ci_low" in part.columns else None)
        fig2.add_hline(y=0, line_dash="dot")
        fig2.update_traces(marker=dict(size=12))
        fig2.update_layout(height=340)
        if fig.data:
            fig.update_layout(height=340)
            st.plotly_chart(fig, width="stretch")
        st.plotly_chart(fig2, width="stretch")
with right:
    keep = [c for c in ("variant", "control", "test", "n_variant", "n_control", "mean_variant", "mean_control",
                        "estimate", "ci_low", "ci_high", "lift", "relative_lift", "lift_ci_low", "lift_ci_high",
                        "p_value", "p_adjusted") if c in part.columns]
    show = part[keep].copy()
    for col in ("p_value", "p_adjusted"):
        if col in show.columns:
            show[col] = show[col].map(ui.pvalue)
    st.markdown("**Frequentist tests** (raw and multiplicity-adjusted p)")
    st.dataframe(show, hide_index=True, width="stretch")
    bayes = [c for c in BAYES if c in part.columns]
    if bayes:
        st.markdown("**Bayesian** — a probability that the variant is better, *not a p-value*")
        b = part[["variant"] + bayes].copy()
        for col in bayes:
            if col != "expected_loss":
                b[col] = b[col].map(lambda x: f"{float(x):.1%}" if pd.notna(x) else "-")
        st.dataframe(b, hide_index=True, width="stretch")

with st.expander("Every comparison (all metrics, all columns)"):
    st.dataframe(comparisons, hide_index=True, width="stretch")

# ------------------------------------------------------------------------------------------- sequential
st.subheader("Sequential monitoring")
seq = report.get("sequential")
seq_rows = seq if isinstance(seq, list) else (seq or {}).get("looks") or (seq or {}).get("history") or []
seq_df = pd.DataFrame([r for r in seq_rows if isinstance(r, dict)])
if seq_df.empty:
    st.caption("The report has no sequential history (one look only).")
else:
    x = next((c for c in ("date", "day", "time", "timestamp", "look", "n", "batch", "step") if c in seq_df.columns),
             seq_df.columns[0])
    if "metric" in seq_df.columns and metric is not None and (seq_df["metric"] == metric).any():
        seq_df = seq_df[seq_df["metric"] == metric]
    y = next((c for c in ("estimate", "lift", "diff", "p_value") if c in seq_df.columns), None)
    if y is None:
        st.dataframe(seq_df, hide_index=True, width="stretch")
    else:
        fig = go.Figure()
        for variant, g in seq_df.groupby("variant") if "variant" in seq_df.columns else [("", seq_df)]:
            g = g.sort_values(x)
            if {"ci_low", "ci_high"} <= set(g.columns):
                fig.add_trace(go.Scatter(x=list(g[x]) + list(g[x])[::-1],
                                         y=list(g["ci_high"]) + list(g["ci_low"])[::-1], fill="toself",
                                         opacity=0.2, line=dict(width=0), name=f"{variant} confidence sequence"))
            fig.add_trace(go.Scatter(x=g[x], y=g[y], mode="lines+markers", name=f"{variant} {y}"))
        fig.add_hline(y=0, line_dash="dot")
        fig.update_layout(height=360, title=f"{metric or ''}: always-valid interval at each look", xaxis_title=x)
        st.plotly_chart(fig, width="stretch")

plots = [a for a in store.list_artifacts(run["run_id"]) if a["path"].startswith("ab_") and a["path"].endswith(".png")]
if plots:
    with st.expander(f"The stage's plots ({len(plots)})"):
        for a in plots:
            data = store.artifact_bytes(run["run_id"], a["path"])
            if data:
                st.image(data, caption=a["path"])
