"""`store.env_set` and the three blocks built on it: each variable is set inside and, on exit (an
exception included), put back as it was or removed when it was not set."""

from __future__ import annotations

import os

import mlflow
import pytest

from pipeline.tracking import store
from pipeline.tracking.pose_model import using_tracking_uri


def test_env_set_restores_a_set_variable_and_removes_a_new_one(monkeypatch):
    monkeypatch.setenv("CPM_TEST_WAS_SET", "before")
    monkeypatch.delenv("CPM_TEST_WAS_UNSET", raising=False)
    with pytest.raises(RuntimeError, match="leaves the block"):
        with store.env_set(CPM_TEST_WAS_SET="inside", CPM_TEST_WAS_UNSET="new"):
            assert (os.environ["CPM_TEST_WAS_SET"], os.environ["CPM_TEST_WAS_UNSET"]) == ("inside", "new")
            raise RuntimeError("leaves the block")
    assert os.environ["CPM_TEST_WAS_SET"] == "before" and "CPM_TEST_WAS_UNSET" not in os.environ


def test_bounded_requests_and_quiet_downloads_set_mlflows_variables_for_the_block(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    with store.bounded_requests(2.9), store.quiet_artifact_downloads():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "2"  # whole seconds, rounded down
        assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ and "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ


@pytest.mark.parametrize("exported", [None, "sqlite:///elsewhere.db"])
def test_using_tracking_uri_puts_back_mlflows_uri_and_the_exported_variable(monkeypatch, tmp_path, exported):
    if exported is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", exported)
    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with using_tracking_uri(uri):
        assert mlflow.get_tracking_uri() == uri and os.environ["MLFLOW_TRACKING_URI"] == uri
    assert os.environ.get("MLFLOW_TRACKING_URI") == exported and mlflow.get_tracking_uri() == before
