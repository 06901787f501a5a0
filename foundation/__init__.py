"""Foundation: errors and atomic I/O every layer may use (no MLflow, Typer, Rich or torch)."""
