"""The tracking URI's secrets: masked wherever the URI is printed, logged or stored, while the
config that connects keeps it as given."""

from __future__ import annotations

import hashlib

import pytest
import torch

from cpm_model.config import load_config
from pipeline.distributed.identity import identity_of
from pipeline.distributed.space import make_trial
from pipeline.redaction import public_config, redact_uri, uri_secrets
from pipeline.train.checkpoint import build_checkpoint

PASSWORD = "pw-6f1d2c9a8b"  # distinctive, so a search of the output for it cannot match by chance
WITH_PASSWORD = f"postgresql://u:{PASSWORD}@h/db"
SHOWN = "postgresql://u:***@h/db"


@pytest.mark.parametrize("uri, expected", [
    ("postgresql://mlflow:secret@db.internal:5432/mlflow", "postgresql://mlflow:***@db.internal:5432/mlflow"),
    ("postgresql+psycopg://u:p%40ss@h/db?connect_timeout=5", "postgresql+psycopg://u:***@h/db?connect_timeout=5"),
    ("https://user:token@mlflow.example.com", "https://user:***@mlflow.example.com"),
    ("postgresql://u@h/db?sslmode=require&password=secret", "postgresql://u@h/db?sslmode=require&password=***"),
    ("https://mlflow.example.com/?token=abc123", "https://mlflow.example.com/?token=***"),
    ("http://h:5000/?access_token=abc&x=1", "http://h:5000/?access_token=***&x=1"),
    ("postgresql://u:a/b@h/db", "postgresql://u:***@h/db"),  # an unescaped '/' in the password
    # Both kinds at once; ';' separates query parameters too, '#' ends them.
    ("mysql://u:pw@h/db?sslpassword=x&a=b;token=t#frag", "mysql://u:***@h/db?sslpassword=***&a=b;token=***#frag"),
])
def test_redact_uri_masks_passwords_and_tokens(uri, expected):
    assert redact_uri(uri) == expected


def test_uri_secrets_are_the_masked_parts_as_written():
    assert uri_secrets("postgresql://u:p%40ss@h/db?password=x&token=t") == ["p%40ss", "x", "t"]


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "postgresql://mlflow@db:5432/mlflow",
                                 "sqlite:////home/u/mlflow.db", "file:///tmp/mlruns", "user:pw@h", None])
def test_redact_uri_leaves_a_uri_without_secrets_unchanged(uri):
    assert redact_uri(uri) is uri


def test_config_prints_and_stores_the_tracking_uri_without_its_password():
    config = load_config("synthetic_tiny", [f"tracking.tracking_uri={WITH_PASSWORD}"])
    public = public_config(config)
    assert config.tracking.tracking_uri == WITH_PASSWORD  # the driver connects with it
    assert public.tracking.tracking_uri == SHOWN
    assert public.flat_params()["tracking.tracking_uri"] == SHOWN
    assert PASSWORD not in public.to_yaml() and SHOWN in public.to_yaml()
    # The rest is the same config; a config without secrets is not copied.
    assert public.with_overrides({"tracking.tracking_uri": WITH_PASSWORD}) == config
    plain = load_config("synthetic_tiny")
    assert public_config(plain) is plain


def test_a_checkpoint_holds_the_config_without_the_password():
    config = load_config(None, [f"tracking.tracking_uri={WITH_PASSWORD}?token=tok-3e7a90c41d"])
    checkpoint = build_checkpoint(torch.nn.Linear(2, 1), config, epoch=1)
    assert checkpoint["config"]["tracking"]["tracking_uri"] == f"{SHOWN}?token=***"
    assert checkpoint["config"]["model"] == config.to_dict()["model"]
    assert config.tracking.tracking_uri.startswith(WITH_PASSWORD)  # the caller's config is untouched


def test_trials_and_the_sweep_record_get_the_masked_uri():
    config = load_config(None, [f"tracking.tracking_uri={WITH_PASSWORD}"])
    spec = make_trial(config, {"model.stages": 2}).public()
    assert spec.config.tracking.tracking_uri == SHOWN and spec.config.model.stages == 2
    assert PASSWORD not in spec.config.to_yaml()
    identity = identity_of(config, WITH_PASSWORD)
    assert identity["tracking_uri"] == SHOWN
    # The store is compared by the hash of the URI as given: other credentials are another store.
    assert identity["tracking_uri_sha256"] == hashlib.sha256(WITH_PASSWORD.encode()).hexdigest()
    assert PASSWORD not in repr(identity)


@pytest.mark.parametrize("command", ["fit", "sweep"])
def test_print_config_masks_the_password(command, capsys):
    from pipeline import fit, sweep

    main = {"fit": fit.main, "sweep": sweep.main}[command]
    assert main(["--config", "synthetic_tiny", "--tracking-uri", f"{WITH_PASSWORD}?token=tok-3e7a90c41d",
                 "--print-config"]) == 0
    out = capsys.readouterr().out
    assert f"tracking_uri: {SHOWN}?token=***" in out and PASSWORD not in out and "tok-3e7a90c41d" not in out
