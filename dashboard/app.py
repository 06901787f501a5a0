"""Flywheel dashboard: `flywheel dashboard` runs `streamlit run dashboard/app.py`.

Reviewers compare results and decide; ML engineers check runs. The MLflow UI shows runs; this shows
decisions. Read-only: every page reads MLflow through `flywheel.dashboard.store`, which only searches and reads.
The tracking URI is the pipelines' own (`MLFLOW_TRACKING_URI`, else `.flywheel/mlflow.db`).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run dashboard/app.py` puts dashboard/ on sys.path, not the repo root; an editable install
# makes `dashboard` importable anyway, a plain checkout needs this.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from flywheel.dashboard import store, ui  # noqa: E402

st.set_page_config(page_title="Flywheel", page_icon=":material/cycle:", layout="wide")

pages = [
    st.Page(ui.PAGES["overview"], title="Overview", icon=":material/home:", default=True),
    st.Page(ui.PAGES["datasets"], title="Datasets", icon=":material/dataset:", url_path="datasets"),
    st.Page(ui.PAGES["training"], title="Training", icon=":material/model_training:", url_path="training"),
    st.Page(ui.PAGES["embeddings"], title="Embeddings", icon=":material/scatter_plot:", url_path="embeddings"),
    st.Page(ui.PAGES["prompts"], title="Prompt eval", icon=":material/grid_on:", url_path="prompt-eval"),
    st.Page(ui.PAGES["ab"], title="A/B", icon=":material/science:", url_path="ab"),
    st.Page(ui.PAGES["gate"], title="Gate and registry", icon=":material/verified:", url_path="gate"),
]
page = st.navigation(pages)
ui.sidebar_footer(store.uri())
page.run()
