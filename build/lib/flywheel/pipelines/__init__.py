"""Flywheel's shell: the `flywheel` CLI, config, MLflow tracking and orchestration (plus the data logic of mining)."""
