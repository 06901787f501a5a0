"""Training: loss and eval-loss curves of several runs overlaid, tokens/s, and the loss-mask audit."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from flywheel.dashboard import store, ui

st.title("Training")
runs = store.runs("train", parents_only=True)
if not runs:
    ui.empty_state("training runs", "flywheel train --config configs/train/smollm2-lora.yaml",
                   "`flywheel demo` trains a few CPU steps on the demo dataset.")
    st.stop()

chosen = ui.pick_run(runs, "Runs to overlay", key="training_runs", multi=True, default_n=3)
if not chosen:
    st.caption("Pick at least one run.")
    st.stop()

CURVES = ["loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s"]
rows = []
for (run, key), history in zip(*store.metric_histories([(r, k) for r in chosen for k in CURVES])):
    for point in history:
        rows.append({"run": ui.run_label(run), "metric": key, "step": point["step"], "value": point["value"]})
curves = pd.DataFrame(rows, columns=["run", "metric", "step", "value"])



def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


summary = []
for run in chosen:
    c = curves[curves["run"] == ui.run_label(run)]
    tps = c[c["metric"] == "tokens_per_s"]["value"]
    summary.append({
        "run": run["run_name"], "started": ui.when(run["start_time"]), "status": run["status"],
        "base model": run["tags"].get("flywheel.base_model", "-"),
        "dataset": run["tags"].get("flywheel.input.dataset_version", "-")[:12],
        "backend": run["tags"].get("flywheel.backend", "-"), "device": run["tags"].get("flywheel.device", "-"),
        "steps": int(c[c["metric"] == "loss"]["step"].max()) if (c["metric"] == "loss").any() else None,
        "final loss": _round(run["metrics"].get("loss")), "final eval loss": _round(run["metrics"].get("eval_loss")),
        "tokens/s (mean)": _round(float(tps.mean()), 1) if len(tps) else None,
    })
st.dataframe(pd.DataFrame(summary), hide_index=True, width="stretch")

loss = curves[curves["metric"].isin(["loss", "eval_loss"])]
if loss.empty:
    st.caption("These runs logged no loss curve.")
else:
    fig = px.line(loss, x="step", y="value", color="run", line_dash="metric", markers=True,
                  labels={"value": "loss"}, title="Train loss (solid) and eval loss (dashed)")
    fig.update_layout(height=420, legend=dict(orientation="h", y=-0.25))
    st.plotly_chart(fig, width="stretch")

cols = st.columns(3)
for col, key, title in zip(cols, ["tokens_per_s", "learning_rate", "grad_norm"],
                           ["Tokens per second", "Learning rate", "Gradient norm"]):
    part = curves[curves["metric"] == key]
    with col:
        if part.empty:
            st.caption(f"No `{key}` logged.")
            continue
        fig = px.line(part, x="step", y="value", color="run", title=title)
        fig.update_layout(height=280, showlegend=False, margin=dict(l=10, r=10, t=40, b=10))
        st.plotly_chart(fig, width="stretch")

# ------------------------------------------------------------------------------------------- audit
st.subheader("Loss-mask audit")
run = chosen[0] if len(chosen) == 1 else ui.pick_run(chosen, "Audit of", key="training_audit")
audit = store.artifact_json(run["run_id"], "audit.json")
if not isinstance(audit, dict):
    st.caption("No `audit.json` on this run.")
elif "examples_used" in audit:
    # The shape written by training/audit.py: what the trainer really trains on, checked before step 1.
    problems = audit.get("problems") or []
    if problems:
        for problem in problems:
            st.error(problem, icon=":material/error:")
    else:
        st.success("Audit passed: every example trains on something and the end-of-turn token is trained.",
                   icon=":material/check_circle:")
    per = audit.get("trained_per_example") or {}
    ui.metrics_row([
        ("examples used", f"{audit['examples_used']:,} / {audit.get('examples', '?'):,}"),
        ("tokens trained", f"{audit.get('trained_fraction', 0):.0%} of {audit.get('tokens_total', 0):,}"),
        ("trained per example", f"{per.get('min', '?')} / {per.get('mean', '?')} / {per.get('max', '?')}"),
        ("zero-trained examples", audit.get("zero_trained_examples", 0)),
    ])
    ui.metrics_row([
        (f"end-of-turn {audit.get('eot_token', '')} trained", f"{audit.get('examples_with_eot_trained', 0):,} ex."),
        ("truncated", audit.get("truncated", 0)),
        ("dropped (overlong / emptied)", f"{audit.get('dropped_overlong', 0)} / "
                                         f"{audit.get('dropped_truncated_to_nothing', 0)}"),
        ("longest example", f"{audit.get('max_length_seen', 0):,} tok"),
    ])
    st.caption(f"min / mean / max trained tokens per example · template: {audit.get('template', '?')}")
    with st.expander("Full audit"):
        st.json(audit, expanded=False)
else:
    st.json(audit, expanded=False)

generations = store.table_artifact(run["run_id"], "generations.json")
if generations is not None:
    st.subheader("Generations: base vs adapter")
    st.dataframe(generations, hide_index=True, width="stretch")

adapter_meta = store.artifact_json(run["run_id"], "adapter/flywheel_adapter.json")
if isinstance(adapter_meta, dict):
    with st.expander("Adapter identity (`adapter/flywheel_adapter.json`)"):
        st.json({k: v for k, v in adapter_meta.items() if k != "chat_template"}, expanded=True)
