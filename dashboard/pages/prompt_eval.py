"""Prompt eval: the variant × target matrix as a heatmap, paired comparisons, generations side by side."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from flywheel.dashboard import store, ui
from flywheel.pipelines import tags as T

st.title("Prompt eval")
runs = store.runs("prompts", parents_only=True)
if not runs:
    ui.empty_state("prompt evaluations", "flywheel eval --config configs/eval/<suite>.yaml",
                   "`flywheel demo` evaluates two prompt variants on the base model and the fresh adapter.")
    st.stop()

run = ui.pick_run(runs, "Evaluation run", key="prompts_run")
with ui.bad_run_shown(run, "this evaluation"):
    results = store.artifact_json(run["run_id"], "results.json")
    if not isinstance(results, dict) or not results.get("cells"):
        st.warning("This run has no `results.json` with cells (did it finish?).")
        st.stop()

    cells = pd.DataFrame(results["cells"])
    for col in ("variant", "target", "metric", "mean", "ci_low", "ci_high", "n"):
        if col not in cells.columns:
            cells[col] = None
    cells["variant"] = cells["variant"].astype(str)
    cells["target"] = cells["target"].astype(str)
    metric_names = list(dict.fromkeys(cells["metric"]))
    ui.metrics_row([("Variants", str(cells["variant"].nunique())), ("Targets", str(cells["target"].nunique())),
                    ("Metrics", str(len(metric_names))),
                    ("Cases", str(int(cells["n"].max())) if cells["n"].notna().any() else "-")])

    # ------------------------------------------------------------------------------------------- matrix
    st.subheader("Variant × target")
    primary = results.get("primary_metric")  # what the gate decides on: shown first
    metric = st.selectbox("Metric", metric_names, key="prompts_metric",
                          index=metric_names.index(primary) if primary in metric_names else 0)
    part = cells[cells["metric"] == metric]
    grid = part.pivot_table(index="variant", columns="target", values="mean", aggfunc="first")
    text = part.assign(label=[f"{ui.num(m)}<br>[{ui.num(lo)}, {ui.num(hi)}]" for m, lo, hi in
                              zip(part["mean"], part["ci_low"], part["ci_high"])]
                       ).pivot_table(index="variant", columns="target", values="label", aggfunc="first")
    direction = next((d for d in part.get("direction", pd.Series(dtype=str)).dropna()), None) \
        or ((results.get("metrics") or {}).get(metric) or {}).get("direction")
    # Brighter = better whichever way the metric points (NLL: lower is better).
    scale = "Viridis_r" if direction == "lower" else "Viridis"
    fig = px.imshow(grid, color_continuous_scale=scale, aspect="auto", labels=dict(color=metric))
    fig.update_traces(text=text.reindex(index=grid.index, columns=grid.columns).values, texttemplate="%{text}")
    fig.update_layout(height=120 + 70 * len(grid.index), margin=dict(l=10, r=10, t=10, b=10))
    st.plotly_chart(fig, width="stretch")
    description = ((results.get("metrics") or {}).get(metric) or {}).get("description")
    st.caption(f"{ui.text(metric)}: {ui.text(direction or '?')} is better"
               + (f" — {ui.text(description)}" if description else "")
               + f" · cell = mean [95 % CI] over the same {ui.num(part['n'].max())} cases")
    with st.expander("All cells (mean and 95 % CI)"):
        st.dataframe(cells, hide_index=True, width="stretch")

    # ------------------------------------------------------------------------------------------- comparisons
    st.subheader("Paired comparisons (same cases)")
    comparisons = pd.DataFrame(results.get("comparisons") or [])
    if comparisons.empty:
        st.caption("No paired comparisons in `results.json`.")
    else:
        if "metric" in comparisons.columns and st.toggle("Only the metric above", value=True):
            comparisons = comparisons[comparisons["metric"] == metric]
        keep = [c for c in ("variant", "control", "metric", "test", "n", "estimate", "ci_low", "ci_high", "p_value",
                            "p_adjusted", "outcome") if c in comparisons.columns]
        show = comparisons[keep].copy()
        for col in ("p_value", "p_adjusted"):
            if col in show.columns:
                show[col] = show[col].map(ui.pvalue)
        if "p_adjusted" in comparisons.columns:
            show.insert(0, "", ["★ significant" if (p is not None and p == p and p < 0.05) else "n.s."
                                for p in comparisons["p_adjusted"]])
        st.dataframe(show, hide_index=True, width="stretch")

    for note in results.get("notes") or []:
        st.caption(f"note: {ui.text(note)}")
    failures = results.get("failures") or {}
    failed = (sum(int(f.get("failed") or 0) for f in failures.values() if isinstance(f, dict))
              if isinstance(failures, dict) else int(failures))  # schema 1 wrote one count
    if failed:
        st.warning(f"{failed} case(s) failed to generate or score: they count as failures, see below.")

    # ------------------------------------------------------------------------------------------- cases
    st.subheader("Generations side by side")
    gen = results.get("generation") or {}
    gen_tokens = gen.get("max_tokens", gen.get("max_new_tokens"))  # results.json schema 2 / 1
    if isinstance(gen_tokens, int) and gen_tokens <= 1:
        sample = run["tags"].get(T.EVAL_SAMPLE_RUN)
        st.info(f"This evaluation scored the reference answers only (NLL), so each generation below stops after "
                f"{gen_tokens} token: it is not what a user would read. "
                + (f"Real answers to the first cases are in the evaluation run `gate-sample` ({ui.short(sample)})."
                   if sample else "No sample with full answers was generated for it."))
    kids = store.children("prompts", run["run_id"])
    if not kids:
        st.caption("No child runs (variant × target) under this evaluation.")
        st.stop()
    label = {k["run_id"]: f"{k['params'].get('variant', '?')} × {k['params'].get('target', '?')}" for k in kids}
    picked = st.multiselect("Cells", list(label), default=list(label)[:4], format_func=label.get, key="prompts_cells")
    tables = {label[rid]: t for rid in picked if (t := store.table_artifact(rid, "cases.json")) is not None}
    if not tables:
        st.caption("No `cases.json` tables on the picked cells.")
        st.stop()
    first = next(iter(tables.values()))
    id_col = next((c for c in ("case_id", "id", "case") if c in first.columns), None)
    out_col = next((c for c in ("output", "generation", "response", "completion", "answer") if c in first.columns),
                   None)
    if id_col is None or out_col is None:
        for name, table in tables.items():
            st.markdown(f"**{ui.text(name)}**")
            st.dataframe(table, hide_index=True, width="stretch")
        st.stop()
    case_ids = list(dict.fromkeys(first[id_col].astype(str)))
    case = st.selectbox(f"Case ({len(case_ids)})", case_ids, key="prompts_case")
    row0 = first[first[id_col].astype(str) == case].iloc[0]
    for col in ("prompt", "input", "question", "reference", "context"):
        if col in first.columns and pd.notna(row0[col]) and str(row0[col]).strip():
            st.markdown(f"**{col}**")
            st.text(str(row0[col])[:2000])
    cols = st.columns(len(tables))
    for col, (name, table) in zip(cols, tables.items()):
        with col:
            st.markdown(f"**{ui.text(name)}**")
            rows = table[table[id_col].astype(str) == case] if id_col in table.columns else table.iloc[0:0]
            if rows.empty:
                st.caption("case missing in this cell")
                continue
            row = rows.iloc[0]
            st.text(str(row.get(out_col, ""))[:3000])
            for flag in ("error", "failed_assertions"):
                if flag in table.columns and pd.notna(row.get(flag)) and str(row.get(flag)).strip():
                    st.caption(f":red[{flag.replace('_', ' ')}: {ui.text(str(row[flag])[:300])}]")
            scores = {c.removeprefix("m."): row[c] for c in table.columns if c not in (id_col, out_col, "cached")
                      and pd.api.types.is_numeric_dtype(table[c]) and pd.notna(row[c])}
            if scores:
                st.caption(" · ".join(f"{ui.text(k)} {ui.num(v)}" for k, v in scores.items()))
