"""MLflow only: the tracking store (store), the ordered, outage-proof writer (writer) and the Tune
callback that writes each trial's run from the sweep driver (trial_logger)."""
