"""Datasets -> person crops -> ideal belief maps -> HDF5 cache (this package owns the cache format).

No Ray Train/Tune and no MLflow here: `python -m preprocessing build` runs on its own.
"""
