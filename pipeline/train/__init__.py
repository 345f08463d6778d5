"""One training run in plain PyTorch: the worker loop, its data, schedule, checkpoints and scoring.

Nothing under pipeline/train imports Ray or MLflow (tests/test_layout.py checks it): the same
loop runs in one process (`python -m pipeline.fit`) and inside a Ray Train worker.
"""
