"""Convolutional Pose Machines in plain PyTorch and NumPy (no Ray, MLflow or h5py here).

`load(path_or_model_uri)` is the Python API of a trained model (see `pipeline.predictor`):

    import cpm_model
    predictor = cpm_model.load("runs/synthetic_tiny/best.pt")    # or "models:/NAME/VERSION"
    record = predictor.predict("photo.jpg")                       # or an RGB uint8 array
    for joint in record["joints"]:
        print(joint["name"], joint["x"], joint["y"], joint["confidence"])
"""

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


def load(source, device=None, batch_size=32, flip=False, tracking_uri=None):
    """A predictor of a checkpoint file (or its directory) or an MLflow model URI; its `predict(image)`
    and `predict_batch(images)` return cpm-predict's records. The checkpoint reader and the
    inference code live in `pipeline` (imported here, on first use, so `import cpm_model` stays
    light); MLflow is imported only for a model URI."""
    from pipeline.predictor import load as load_predictor

    return load_predictor(source, device=device, batch_size=batch_size, flip=flip, tracking_uri=tracking_uri)


__all__ = [
    "load",
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
