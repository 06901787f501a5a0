"""Flywheel's shell: the `flywheel` CLI, config, MLflow tracking and registry, orchestration and progress."""

# Importing the shell registers where the tracking store lives with the foundation's output check, so no command
# can write an output over the store, whichever module it imports first.
from flywheel.pipelines import tracking as _tracking  # noqa: F401
