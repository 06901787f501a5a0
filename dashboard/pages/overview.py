"""Overview: who is champion, how it got there (logs -> dataset -> train -> eval -> gate -> Modelfile), and the
last run of every stage."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from flywheel.dashboard import store, ui

st.title("Flywheel")
st.caption("Rated chat logs → datasets → LoRA adapters → evaluated, gated and published models.")

# ------------------------------------------------------------------------------------------- champion
st.header("Champion")
champions = store.champions()
if not champions:
    ui.empty_state("champion model", "flywheel demo",
                   "A champion exists once `flywheel gate --promote` passes a candidate "
                   "(the demo registers `flywheel-demo`).")
for version in champions:
    tags = version["tags"]
    since = tags.get("flywheel.champion_since", "")[:16].replace("T", " ")
    hops = store.lineage(version)
    base = (tags.get("flywheel.base_model") or (hops["train"] or {}).get("tags", {}).get("flywheel.base_model")
            or tags.get("flywheel.base_model_sha256", "")[:12] or "unknown")
    with st.container(border=True):
        st.markdown(f"### :material/trophy: `{version['name']}` v{version['version']}")
        st.markdown(f"champion since **{since or 'unknown'}** · base model **{base}** · "
                    f"registered {ui.when(version['creation_timestamp'])}")
    st.subheader(f"Lineage of `models:/{version['name']}@champion`")
    cols = st.columns(6)
    with cols[0]:
        st.markdown("**Logs**")
        for path in (hops["logs"] or "unknown").split(","):
            st.caption(f"`{'/'.join(path.strip().split('/')[-2:])}`")
    with cols[1]:
        st.markdown("**Dataset**")
        st.caption(f"version `{(hops['dataset_version'] or 'unknown')[:12]}`")
        ui.run_link("mine run", "datasets", (hops["mine"] or {}).get("run_id"))
    with cols[2]:
        st.markdown("**Training**")
        ui.run_link("train run", "training", (hops["train"] or {}).get("run_id"))
    with cols[3]:
        st.markdown("**Evaluation**")
        ui.run_link("eval run", "prompts", (hops["eval"] or {}).get("run_id"))
    with cols[4]:
        st.markdown("**Gate**")
        gate = hops["gate"]
        if gate:
            st.caption(f"decision: **{gate['tags'].get('flywheel.gate.decision', '?')}**")
        ui.run_link("gate run", "gate", (gate or {}).get("run_id"))
    with cols[5]:
        st.markdown("**Modelfile**")
        publish = hops["publish"]
        if publish:
            st.caption(f"`{publish['tags'].get('flywheel.modelfile_path', '?')}`")
        ui.run_link("publish run", "gate", (publish or {}).get("run_id"))

# ------------------------------------------------------------------------------------------- stages
st.header("Last run of each stage")
STAGE_VIEW = [
    ("mine", "datasets", "flywheel mine LOGS --out DIR", ["kept", "split.train", "split.eval"]),
    ("train", "training", "flywheel train --config configs/train/smollm2-lora.yaml", ["loss", "eval_loss"]),
    ("embeddings", "embeddings", "flywheel bench-embeddings --config configs/embeddings.yaml", []),
    ("prompts", "prompts", "flywheel eval --config configs/eval/<suite>.yaml", []),
    ("ab", "ab", "flywheel ab analyze LOGS", []),
    ("gate", "gate", "flywheel gate --candidate URI --config configs/gate.yaml", []),
    ("publish", "gate", "flywheel publish MODEL_URI", []),
    ("run", "overview", "flywheel run --config configs/flywheel.yaml", []),
]
rows = []
newest = store.latest_of([stage for stage, *_ in STAGE_VIEW])
for stage, page, command, keys in STAGE_VIEW:
    run = newest[stage]
    if run is None:
        rows.append({"stage": stage, "run": "-", "started": "-", "status": "never run", "summary": f"run `{command}`",
                     "run_id": None, "page": page})
        continue
    summary = ", ".join(f"{k}={ui.num(run['metrics'][k])}" for k in keys if k in run["metrics"])
    if stage == "gate":
        summary = f"decision={run['tags'].get('flywheel.gate.decision', '?')}"
    elif stage == "ab":
        summary = f"SRM={run['tags'].get('flywheel.ab.srm_status', '?')}; " + ", ".join(
            f"{k.rsplit('.', 1)[-1]}: {v}" for k, v in run["tags"].items() if k.startswith("flywheel.ab.verdict."))
    elif stage == "embeddings":
        summary = f"tasks: {run['tags'].get('flywheel.embeddings.tasks', '?')}"
    elif stage == "prompts":
        primary = run["tags"].get("flywheel.eval.primary_metric", "")
        summary = ", ".join(f"{k}={ui.num(v)}" for k, v in run["metrics"].items() if primary and k.endswith(primary))
    elif stage == "publish":
        summary = f"Modelfile {run['tags'].get('flywheel.modelfile_path', '?')}"
    elif stage == "mine":
        summary = f"dataset {run['tags'].get('flywheel.dataset_version', '?')[:12]}; " + summary
    rows.append({"stage": stage, "run": run["run_name"], "started": ui.when(run["start_time"]),
                 "status": run["status"], "summary": summary, "run_id": run["run_id"], "page": page})

st.dataframe(pd.DataFrame(rows).drop(columns=["run_id", "page"]), hide_index=True, width="stretch")
links = st.columns(len(rows))
for col, row in zip(links, rows):
    with col:
        if row["run_id"] and row["page"] != "overview":
            st.page_link(ui.PAGES[row["page"]], label=row["stage"], query_params={"run": row["run_id"]},
                         icon=":material/open_in_new:")
if all(r["run_id"] is None for r in rows):
    ui.empty_state("runs in this store", "flywheel demo", f"Store: `{store.uri()}`")
