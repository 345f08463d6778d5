"""Checkpoints as plain data, readable with `torch.load(path, weights_only=True)`.

A checkpoint file holds one dict:

    format_version     int
    model              model state dict (tensors)
    best_model         state dict of the best epoch so far, or None when that is this epoch
    config             the ExperimentConfig as nested plain data (tracking URI redacted)
    epoch              completed epochs (1-based: 1 after the first epoch)
    optimizer          optimizer state dict
    scheduler          lr scheduler state dict
    rng                {"torch": uint8 tensor, "numpy": plain lists, "python": plain lists}
    metrics            list of per-epoch metric dicts so far
    best_epoch         epoch with the best validation PCK so far (or None)
    joint_names        list of part names (prediction needs them without the cache)
    flip_pairs         list of [a, b]
    tensor_crc32       CRC-32 of every tensor's bytes (added on save, checked on read: torch.load
                       checks the zip's structure, not the tensors' bytes)

Files are written to a temp name, fsynced, renamed into place, and the directory fsynced, so a
crash or a full disk never leaves half a checkpoint under the real name. Resuming from several
kept checkpoints (`load_newest_usable`) skips a corrupt newest one, with a warning naming both.

Nothing here imports Ray or MLflow.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from cpm_model.config import ConfigError, ExperimentConfig, from_dict
from cpm_model.durable import replace_durably, temp_path_for
from pipeline.redaction import public_config

FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"  # the file in every checkpoint directory (epoch_NNNN/, Ray's checkpoint_*/)
BEST_MODEL_FILE = "best_model.pt"  # a trial's best weights, logged as an MLflow artifact
CRC_KEY = "tensor_crc32"

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or made for another model."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that is missing, truncated or whose bytes changed (an older kept one may do)."""


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint was unusable; training resumed from an older one."""


# --- RNG state as plain data --------------------------------------------------------------------

def capture_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": [int(v) for v in internal],
                   "gauss": None if gauss is None else float(gauss)},
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


# --- building -----------------------------------------------------------------------------------

def _cpu_state(state_dict: dict) -> dict:
    return {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in state_dict.items()}


def build_checkpoint(model: torch.nn.Module, config: ExperimentConfig, epoch: int, optimizer=None,
                     scheduler=None, metrics: list[dict] | None = None, best_epoch: int | None = None,
                     best_model_state: dict | None = None, joint_names=None, flip_pairs=None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "model": _cpu_state(model.state_dict()),
        "best_model": _cpu_state(best_model_state) if best_model_state is not None else None,
        "config": public_config(config).to_dict(),  # no password of the tracking URI in a file
        "epoch": int(epoch),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": _plain_scheduler_state(scheduler) if scheduler is not None else None,
        "rng": capture_rng_state(),
        "metrics": [_plain_metrics(m) for m in (metrics or [])],
        "best_epoch": None if best_epoch is None else int(best_epoch),
        "joint_names": list(joint_names) if joint_names is not None else None,
        "flip_pairs": [list(map(int, p)) for p in flip_pairs] if flip_pairs is not None else None,
    }


def _plain_scheduler_state(scheduler) -> dict:
    """The scheduler state without its lr functions (LambdaLR stores a callable object's __dict__,
    which weights_only loading refuses); the functions are rebuilt from the config on resume."""
    state = dict(scheduler.state_dict())
    if "lr_lambdas" in state:
        state["lr_lambdas"] = [None] * len(state["lr_lambdas"])
    return state


def _plain_metrics(metrics: dict) -> dict:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, np.generic):
            value = value.item()
        out[str(key)] = value
    return out


# --- saving and reading ------------------------------------------------------------------------

def tensor_crc32(value, crc: int = 0) -> int:
    """CRC-32 over the bytes of every tensor in nested dicts / lists, in a fixed order."""
    if torch.is_tensor(value):
        flat = value.detach().cpu().contiguous().reshape(-1)
        return zlib.crc32(flat.view(torch.uint8).numpy() if flat.numel() else b"", crc)
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            if key != CRC_KEY:
                crc = tensor_crc32(value[key], zlib.crc32(str(key).encode(), crc))
        return crc
    if isinstance(value, (list, tuple)):
        for item in value:
            crc = tensor_crc32(item, crc)
    return crc


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> Path:
    """Write durably (temp file, fsync, rename, fsync of the directory): a crash never leaves half
    a checkpoint under `path`. Adds the tensors' CRC-32, which read_checkpoint checks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        torch.save({**checkpoint, CRC_KEY: tensor_crc32(checkpoint)}, tmp)
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint dict, with weights_only=True; CorruptCheckpointError naming the file when it is
    missing, unreadable or its tensors fail their checksum, CheckpointError when it is no checkpoint."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as exc:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt or not a plain-data PyTorch checkpoint "
                                     f"({type(exc).__name__})") from None
    if not isinstance(data, dict) or "model" not in data or "config" not in data:
        raise CheckpointError(f"checkpoint {path} is not a cpm-pipeline checkpoint "
                              f"(expected a dict with 'model' and 'config')")
    if CRC_KEY in data and tensor_crc32(data) != data[CRC_KEY]:  # older files have no checksum
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: its tensors do not match their checksum")
    data.pop(CRC_KEY, None)
    return data


def load_newest_usable(paths: list, expected_config: ExperimentConfig | None = None) -> tuple[Path, dict]:
    """(path, checkpoint) of the first of `paths` (newest first) that loads; a corrupt one is
    skipped with a warning naming it and the one used. CheckpointError when none loads."""
    failures = []
    for path in map(Path, paths):
        try:
            checkpoint = load_checkpoint(path, expected_config)
        except CorruptCheckpointError as exc:
            failures.append(str(exc))
            continue
        if failures:
            message = f"{'; '.join(failures)}: resuming from the previous kept checkpoint {path} instead"
            log.warning(message)
            warnings.warn(message, CheckpointFallbackWarning, stacklevel=2)
        return path, checkpoint
    raise CheckpointError(f"no usable checkpoint to resume from: {'; '.join(failures) or 'none given'}")


def load_checkpoint(path: str | os.PathLike, expected_config: ExperimentConfig | None = None) -> dict:
    """Read a checkpoint; with `expected_config`, check that its model matches that config's model.

    Returns the dict with `config` turned into an ExperimentConfig.
    """
    data = read_checkpoint(path)
    try:
        data["config"] = from_dict(data["config"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path} holds an invalid config: {exc}") from None
    if expected_config is not None:
        differences = model_config_differences(data["config"], expected_config)
        if differences:
            raise CheckpointError(f"checkpoint {path} was made for another model: {'; '.join(differences)}")
    return data


_MODEL_WORDS = {"stages": "stages", "backbone": "backbone", "width": "width",
                "stage1_kernel": "stage-1 kernel", "later_kernel": "later-stage kernel",
                "later_convs": "later-stage convolutions", "batch_norm": "batch norm",
                "center_sigma": "centre-map sigma"}


def model_config_differences(checkpoint_config: ExperimentConfig, config: ExperimentConfig) -> list[str]:
    """Human-readable differences between the model parts of two configs."""
    out = []
    for key, word in _MODEL_WORDS.items():
        a, b = getattr(checkpoint_config.model, key), getattr(config.model, key)
        if a != b:
            out.append(f"checkpoint has {word} {a}, model has {b}" if key == "backbone" or key == "batch_norm"
                       else f"checkpoint has {a} {word}, model has {b}")
    if checkpoint_config.preprocess.input_size != config.preprocess.input_size:
        out.append(f"checkpoint has input size {checkpoint_config.preprocess.input_size}, "
                   f"model has {config.preprocess.input_size}")
    return out


def state_dict_differences(checkpoint_state: dict, model_state: dict, limit: int = 6) -> list[str]:
    """Which keys are missing / unexpected / of another shape, plus the stage counts when they differ."""
    ckpt_keys, model_keys = set(checkpoint_state), set(model_state)
    out = []
    ckpt_stages, model_stages = _count_stages(ckpt_keys), _count_stages(model_keys)
    if ckpt_stages and model_stages and ckpt_stages != model_stages:
        out.append(f"checkpoint has {ckpt_stages} stages, model has {model_stages}")
    missing = sorted(model_keys - ckpt_keys)
    unexpected = sorted(ckpt_keys - model_keys)
    shapes = [f"{k}: checkpoint {tuple(checkpoint_state[k].shape)} vs model {tuple(model_state[k].shape)}"
              for k in sorted(ckpt_keys & model_keys)
              if torch.is_tensor(checkpoint_state[k]) and checkpoint_state[k].shape != model_state[k].shape]
    for label, items in (("missing from checkpoint", missing), ("not in model", unexpected),
                         ("shape differs", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            out.append(f"{label}: {', '.join(items[:limit])}{more}")
    return out


def _count_stages(keys) -> int:
    """Stage count from CPM parameter names: 'stage1.*' plus one per 'later_stages.N.*'."""
    later = {int(k.split(".")[1]) for k in keys if k.startswith("later_stages.") and k.split(".")[1].isdigit()}
    has_stage1 = any(k.startswith("stage1.") for k in keys)
    return (1 if has_stage1 else 0) + (max(later) + 1 if later else 0)


def load_model_state(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Strict load with a readable CheckpointError on mismatch (saying so when the state dict has
    an earlier layout of the network, `CPM.earlier_layout_note`)."""
    differences = state_dict_differences(state_dict, model.state_dict())
    if differences:
        note_of = getattr(model, "earlier_layout_note", None)
        note = note_of(state_dict) if callable(note_of) else None
        raise CheckpointError(f"{source} does not fit this model: {'; '.join(differences)}"
                              + (f" ({note})" if note else ""))
    model.load_state_dict(state_dict)


def load_init_weights(model: torch.nn.Module, path: str | os.PathLike) -> str:
    """Initialise from a local file: a cpm-pipeline checkpoint, a CPM state dict, or VGG weights.

    VGG-19 (torchvision-style 'features.N.weight' keys) go into the VGG front through
    cpm_model.model.load_vgg_weights. Returns a short description of what was loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"init weights file {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means a bad file; name it
        raise CheckpointError(f"init weights file {path} is corrupt or not a PyTorch file "
                              f"({type(exc).__name__})") from None
    if isinstance(data, dict) and "model" in data and "config" in data:
        load_model_state(model, data["model"], f"init weights {path}")
        return f"CPM checkpoint {path}"
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise CheckpointError(f"init weights file {path} is not a state dict")
    if not any(k.startswith("stage1.") for k in data) and any(k.endswith("features.0.weight") for k in data):
        # torchvision-style VGG-19 weights for the VGG front.
        from cpm_model.model import load_vgg_weights

        if getattr(model, "backbone", None) != "vgg":
            raise CheckpointError(f"init weights {path} look like VGG-19 weights, but the model's backbone is "
                                  f"{getattr(model, 'backbone', '?')!r} (set model.backbone=vgg)")
        try:
            loaded = load_vgg_weights(model, data)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"init weights {path}: {exc}") from None
        return f"VGG-19 front ({len(loaded)} tensors) from {path}"
    load_model_state(model, data, f"init weights {path}")
    return f"CPM state dict {path}"
