"""The tracking store's error type, apart from the MLflow client so that the command line can
recognise it without importing MLflow."""


class TrackingError(RuntimeError):
    """The tracking server cannot be reached or used."""
