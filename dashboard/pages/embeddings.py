"""Embeddings: the leaderboard with CIs and significance marks, quality vs speed, per-query drill-down."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from flywheel.dashboard import store, ui

QUALITY = ["ndcg@10", "mrr@10", "map@100", "recall@1", "recall@5", "recall@10", "recall@100", "spearman",
           "pearson", "f1", "precision", "recall"]
SPEED = ["texts_per_s", "latency_p50_ms", "latency_p95_ms", "dims", "size_mb"]

st.title("Embeddings")
runs = store.runs("embeddings", parents_only=True)
if not runs:
    ui.empty_state("embedding benchmarks", "flywheel bench-embeddings --config configs/embeddings.yaml",
                   "`flywheel demo` runs a fast version on the static model.")
    st.stop()

run = ui.pick_run(runs, "Benchmark run", key="embeddings_run")
board = store.artifact_csv(run["run_id"], "leaderboard.csv")
if board is None or board.empty:
    st.warning("This run has no `leaderboard.csv` artifact (did it finish?).")
    st.stop()

metrics = [c for c in QUALITY if c in board.columns and board[c].notna().any()]
metrics += [c for c in board.columns if c not in metrics and c not in SPEED and c not in ("model", "task")
            and not c.endswith(("_ci_low", "_ci_high", "_sig", "_significant"))
            and pd.api.types.is_numeric_dtype(board[c])
            and board[c].notna().any() and c not in ("n", "n_queries", "queries")]
tasks = sorted(board["task"].dropna().unique()) if "task" in board.columns else []
comparisons = store.artifact_csv(run["run_id"], "comparisons.csv")

# ------------------------------------------------------------------------------------------- leaderboard
st.subheader("Leaderboard")
c1, c2 = st.columns(2)
task = c1.selectbox("Task", tasks, key="embeddings_task") if tasks else None
metric = c2.selectbox("Quality metric", metrics, key="embeddings_metric") if metrics else None
view = board[board["task"] == task] if task is not None else board
view = view.dropna(axis=1, how="all")
if metric and metric in view.columns:
    view = view.sort_values(metric, ascending=False)
    metric_cols = [c for c in QUALITY if c in view.columns]
    first = ["model"] + (["vs_best"] if "vs_best" in view.columns else []) + metric_cols
    view = view[first + [c for c in view.columns if c not in first and c != "task"]]
st.dataframe(view, hide_index=True, width="stretch")
if "vs_best" in view.columns:
    st.caption("`vs_best`: each model against the task's best on the same queries; `*` = significant after Holm "
               "correction, no star = the data cannot tell them apart.")

kids = store.children("embeddings", run["run_id"])
if metric and metric in view.columns:
    # A CI per model from its per-query vector (mean ± t·sd/√n): per-query metrics are what the stage keeps.
    import numpy as np
    from scipy import stats as sps

    bars = []
    for k in kids:
        if task is not None and k["params"].get("task") != task:
            continue
        pq = store.artifact_csv(k["run_id"], "per_query.csv")
        model = k["params"].get("model", k["run_name"])
        value = view.loc[view["model"] == model, metric]
        if value.empty:
            continue
        row = {"model": model, metric: float(value.iloc[0]), "lo": None, "hi": None}
        lo_col, hi_col = f"{metric}_ci_low", f"{metric}_ci_high"
        if lo_col in view.columns and pd.notna(view.loc[view["model"] == model, lo_col]).all():
            # The stage's own CI (e.g. bootstrap over STS pairs for a correlation) wins.
            row.update(lo=float(view.loc[view["model"] == model, lo_col].iloc[0]),
                       hi=float(view.loc[view["model"] == model, hi_col].iloc[0]))
        elif pq is not None and metric in pq.columns and len(pq) > 1:
            x = pq[metric].dropna().to_numpy(dtype=float)
            half = sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
            row.update(lo=x.mean() - half, hi=x.mean() + half)
        bars.append(row)
    bars = pd.DataFrame(bars) if bars else view[["model", metric]].assign(lo=None, hi=None)
    has_ci = bars["lo"].notna().any()
    fig = px.bar(bars, x="model", y=metric, title=f"{metric} on {task}" + (" (95 % CI)" if has_ci else ""),
                 error_y=(bars["hi"] - bars[metric]) if has_ci else None,
                 error_y_minus=(bars[metric] - bars["lo"]) if has_ci else None)
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=40, b=10))
    st.plotly_chart(fig, width="stretch")
    if not has_ci:
        st.caption(f"{metric} is one number per task (not a per-query mean): no per-model CI; the paired "
                   "bootstrap comparisons below say which differences are real.")

if comparisons is not None and not comparisons.empty:
    st.markdown("**Paired comparisons** (same queries; bootstrap CI of the difference, Holm-corrected p)")
    comp = comparisons
    if task is not None and "task" in comp.columns:
        comp = comp[comp["task"] == task]
    if metric and "metric" in comp.columns and (comp["metric"] == metric).any():
        comp = comp[comp["metric"] == metric]
    sig_col = next((c for c in ("significant", "sig", "reject") if c in comp.columns), None)
    p_col = next((c for c in ("p_adjusted", "p_holm", "p_value") if c in comp.columns), None)
    comp = comp.copy()
    if sig_col is None and p_col is not None:
        comp["significant"] = comp[p_col] < 0.05
        sig_col = "significant"
    if sig_col is not None:
        comp.insert(0, "", comp[sig_col].map(lambda s: "★ significant" if str(s).lower() in ("true", "1", "1.0")
                                            else "n.s."))
    st.dataframe(comp, hide_index=True, width="stretch")
    note = [c for c in ("note", "warning") if c in comp.columns]
    for c in note:
        for text in comp[c].dropna().unique()[:3]:
            st.caption(f"⚠ {text}")
elif comparisons is not None:
    st.caption("No paired comparisons: one model per task, nothing to compare it with.")
else:
    st.caption("No `comparisons.csv` on this run: significance is unknown.")

# ------------------------------------------------------------------------------------------- quality vs speed
st.subheader("Quality vs speed")
if metric and "texts_per_s" in board.columns:
    scatter = board.dropna(subset=[metric, "texts_per_s"])
    size = "dims" if "dims" in scatter.columns and scatter["dims"].notna().all() else None
    fig = px.scatter(scatter, x="texts_per_s", y=metric, color="model",
                     symbol="task" if "task" in scatter.columns else None, size=size, log_x=True,
                     hover_data=[c for c in ("latency_p50_ms", "latency_p95_ms", "dims", "size_mb")
                                 if c in scatter.columns],
                     labels={"texts_per_s": "encode throughput (texts/s, log)"})
    fig.update_layout(height=420)
    st.plotly_chart(fig, width="stretch")
    speed_cols = [c for c in ["model"] + SPEED + ["peak_rss_mb", "load_s", "warmup_s", "index_build_ms",
                                                  "search_ms_per_query"] if c in board.columns]
    st.dataframe(board[speed_cols].drop_duplicates("model"), hide_index=True, width="stretch")
else:
    st.caption("The leaderboard has no throughput column.")
png = store.artifact_bytes(run["run_id"], "quality_vs_speed.png")
if png:
    with st.expander("The stage's own plot (`quality_vs_speed.png`)"):
        st.image(png)

# ------------------------------------------------------------------------------------------- per query
st.subheader("Per-query drill-down")
if not kids:
    st.caption("No child runs (model × task) under this benchmark.")
    st.stop()
kid_label = {k["run_id"]: f"{k['params'].get('model', k['run_name'])} · {k['params'].get('task', '')}" for k in kids}
if task is not None:
    same_task = [k for k in kids if k["params"].get("task") == task]
    kids = same_task or kids
picked = st.multiselect("Model × task (pick two to compare on the same queries)", [k["run_id"] for k in kids],
                        default=[k["run_id"] for k in kids[:2]], format_func=kid_label.get, key="embeddings_kids")
tables = {}
for rid in picked:
    df = store.artifact_csv(rid, "per_query.csv")
    if df is not None:
        tables[kid_label[rid]] = df
if not tables:
    st.caption("No `per_query.csv` for the picked runs.")
    st.stop()
first = next(iter(tables.values()))
id_col = next((c for c in ("query_id", "qid", "id", "pair_id") if c in first.columns), first.columns[0])
numeric = [c for c in first.columns if c != id_col and pd.api.types.is_numeric_dtype(first[c])]
if not numeric:
    st.dataframe(first, hide_index=True, width="stretch")
    st.stop()
q_metric = st.selectbox("Per-query metric", numeric,
                        index=numeric.index(metric) if metric in numeric else 0, key="embeddings_qmetric")
labels = list(tables)
if len(labels) >= 2 and id_col in tables[labels[1]].columns and q_metric in tables[labels[1]].columns:
    a, b = tables[labels[0]], tables[labels[1]]
    both = a[[id_col, q_metric]].merge(b[[id_col, q_metric]], on=id_col, suffixes=(" A", " B"))
    both["B − A"] = both[f"{q_metric} B"] - both[f"{q_metric} A"]
    wins, losses = int((both["B − A"] > 0).sum()), int((both["B − A"] < 0).sum())
    st.caption(f"A = {labels[0]}; B = {labels[1]} · {len(both)} shared queries: B better on {wins}, "
               f"worse on {losses}, tied on {len(both) - wins - losses}.")
    fig = px.scatter(both, x=f"{q_metric} A", y=f"{q_metric} B", hover_data=[id_col])
    lo_v = float(min(both[f"{q_metric} A"].min(), both[f"{q_metric} B"].min()))
    hi_v = float(max(both[f"{q_metric} A"].max(), both[f"{q_metric} B"].max()))
    fig.add_shape(type="line", x0=lo_v, y0=lo_v, x1=hi_v, y1=hi_v, line=dict(dash="dot"))  # y = x: a tie
    fig.update_layout(height=380)
    st.plotly_chart(fig, width="stretch")
    st.dataframe(both.sort_values("B − A"), hide_index=True, width="stretch")
else:
    st.dataframe(first.sort_values(q_metric), hide_index=True, width="stretch")
