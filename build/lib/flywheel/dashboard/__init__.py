"""Read-only Streamlit dashboard over the MLflow store the pipelines write."""
