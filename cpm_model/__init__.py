"""Convolutional Pose Machines in plain PyTorch and NumPy (no Ray, MLflow or h5py here)."""

from .loss import belief_map_loss
from .metrics import (
    PCKCounts,
    auc,
    auc_from_curve,
    decode_predictions,
    pck,
    pck_counts,
    pck_curve,
    pck_curve_counts,
    pck_curve_from_counts,
    pck_from_counts,
    pckh,
)
from .model import CPM, center_map, load_vgg_weights
from .receptive_field import (
    LayerSpec,
    cpm_layer_spec,
    effective_receptive_field_px,
    receptive_field_px,
    receptive_field_table,
)

__all__ = [
    "CPM",
    "center_map",
    "load_vgg_weights",
    "belief_map_loss",
    "LayerSpec",
    "cpm_layer_spec",
    "receptive_field_px",
    "receptive_field_table",
    "effective_receptive_field_px",
    "PCKCounts",
    "pck",
    "pck_counts",
    "pck_from_counts",
    "pckh",
    "pck_curve",
    "pck_curve_counts",
    "pck_curve_from_counts",
    "auc",
    "auc_from_curve",
    "decode_predictions",
]
