"""A sweep's identity: a unique id, the directory that claims it, and what a resume must share.

At its start a sweep records its resolved config and tracking store in its directory under the
storage path. `--resume` compares against that record, because Tune's restore brings back the
old callbacks (the MLflow logger with the old store) and the old search space: resuming with
another config or store would split the sweep's runs between two stores and two configs.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path

from cpm_model.config import ExperimentConfig
from pipeline.redaction import redact_uri

IDENTITY_FILE = "cpm_sweep_identity.json"
# Where the sweep lives, not what it is: the storage path is the directory the record is found in,
# and the tracking store is compared as the resolved URI.
_LOCATION_KEYS = ("sweep.storage_path", "tracking.tracking_uri")
_UNSET = "(unset)"


class IdentityError(RuntimeError):
    """A sweep id that is taken, or a resume that does not match the sweep it continues."""


def new_sweep_id(config: ExperimentConfig) -> str:
    """Preset name + start time, for people; a random suffix so that two sweeps started in the
    same second get different ids."""
    return f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def identity_of(config: ExperimentConfig, tracking_uri: str) -> dict:
    """The record: flat config params (the tracking URI's secrets masked) and the resolved URI's
    hash (compared) with its redacted form (shown)."""
    params = {k: v for k, v in config.flat_params().items() if k not in _LOCATION_KEYS}
    return {"config": params, "tracking_uri": redact_uri(tracking_uri),
            "tracking_uri_sha256": hashlib.sha256(tracking_uri.encode()).hexdigest()}


def differences(recorded: dict, current: dict) -> list[str]:
    """'key old -> new' for each config key and for the tracking store that differ."""
    current = json.loads(json.dumps(current))  # the types the record has after its round trip
    old, new = recorded.get("config", {}), current["config"]
    lines = [f"{key} {old.get(key, _UNSET)} -> {new.get(key, _UNSET)}"
             for key in sorted(set(old) | set(new)) if old.get(key, _UNSET) != new.get(key, _UNSET)]
    if recorded.get("tracking_uri_sha256") != current["tracking_uri_sha256"]:
        shown_old, shown_new = recorded.get("tracking_uri", _UNSET), current["tracking_uri"]
        lines.append(f"tracking URI {shown_old} -> {shown_new}"
                     + (" (the credentials differ)" if shown_old == shown_new else ""))
    return lines


def claim(sweep_dir: Path, identity: dict) -> None:
    """Create the sweep's directory (atomically: two drivers can never share an id) and record
    its identity in it."""
    try:
        sweep_dir.mkdir()
    except FileExistsError:
        raise IdentityError(already_exists(sweep_dir)) from None
    _write(sweep_dir, identity)


def already_exists(sweep_dir: Path) -> str:
    return (f"sweep id {sweep_dir.name} already exists under {sweep_dir.parent}; "
            f"use --resume {sweep_dir.name} or another id")


def check_resume(sweep_dir: Path, identity: dict) -> None:
    """Refuse to resume with another config or tracking store, naming each difference."""
    path = sweep_dir / IDENTITY_FILE
    if not path.is_file():  # a sweep from before identities were recorded: record this one
        print(f"Note: sweep {sweep_dir.name} has no recorded config; recording the one it resumes with", flush=True)
        _write(sweep_dir, identity)
        return
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"--resume: the sweep's record {path} is unreadable ({exc}); "
                            "delete it to resume without comparing configs") from None
    found = differences(recorded, identity)
    if found:
        raise IdentityError("--resume: the config differs from the sweep's: " + "; ".join(found)
                            + "; start a new sweep or resume with the same config")


def _write(sweep_dir: Path, identity: dict) -> None:
    tmp = sweep_dir / f".{IDENTITY_FILE}.tmp"
    tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))
    os.replace(tmp, sweep_dir / IDENTITY_FILE)
