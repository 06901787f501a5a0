"""Evaluation and statistics as plain functions over plain data: no MLflow, no config parsing, no printing."""
