"""Ablation tables and figures read back from MLflow: the runs (runs), the tables and their
formats (tables), the figures (figures). `python -m pipeline.report` is the command."""
