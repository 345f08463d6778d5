"""Reading joint predictions made anywhere into one (N, P, 2) float64 array, NaN where missing.

Formats, chosen by the file's suffix:
- `.mat`: the CPM authors' release format, variable `prediction_all` of shape (P, 2, N) (joints
  x (x, y) x images, LSP joint order), MATLAB v5/v7 or v7.3 (HDF5). Their benchmark writes MATLAB
  pixel indices (the arg-max row and column of a score map resized to the image, counting from 1)
  and compares them with joints.mat's values unshifted; they are read unshifted too, so that the
  release's figures come out. `--one-based` subtracts 1 instead.
- `.npz` (array `predictions`, or the file's only array) or `.npy`: (N, P, 2).
- `.json`: a list of N images, each a list of P joints `[x, y]` (or `null` when missing), bare
  or under the key `predictions`.
- `.csv`: one row per image, 2P numbers x_0, y_0, x_1, y_1, ... in joint order; an empty cell or
  `nan` is missing; a first row that is not numbers is a header and skipped.
The plain formats are in original-image pixels as joints.mat stores them (this project's frame:
pixel centres at integers, the top-left pixel's centre at (0, 0)), the frame `pipeline.predict`
prints; rows follow the split's images in file order.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from pipeline.cli import UsageError

MATLAB_VARIABLE = "prediction_all"
FORMATS = {".mat": "matlab", ".npz": "npz", ".npy": "npy", ".json": "json", ".csv": "csv"}


def prediction_format(path: Path) -> str:
    """'matlab', 'npz', 'npy', 'json' or 'csv' from the suffix, or UsageError naming the choices."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UsageError(f"--predictions {path}: unknown format {path.suffix!r}; expected one of "
                         f"{', '.join(FORMATS)}")
    return kind


def read_predictions(path: str | Path) -> tuple[np.ndarray, str]:
    """((N, P, 2) float64 predictions, NaN where missing; the format's name)."""
    path = Path(path)
    kind = prediction_format(path)
    if not path.is_file():
        raise FileNotFoundError(f"--predictions {path} does not exist")
    readers = {"matlab": read_matlab, "npz": read_npz, "npy": read_npz, "json": read_json, "csv": read_csv}
    predictions = readers[kind](path)
    if predictions.ndim != 3 or predictions.shape[-1] != 2:
        raise UsageError(f"--predictions {path}: shape {predictions.shape}; expected (N images, P joints, 2)")
    return predictions, kind


def read_matlab(path: Path) -> np.ndarray:
    """`prediction_all` (P, 2, N) of a .mat file, as (N, P, 2)."""
    import h5py
    import scipy.io

    if h5py.is_hdf5(str(path)):  # MATLAB v7.3 (save -v7.3) writes HDF5, which scipy cannot read
        return matlab_layout(read_matlab_v73(path), path)
    try:
        contents = scipy.io.loadmat(str(path), variable_names=[MATLAB_VARIABLE])
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError... on a corrupt file
        raise UsageError(f"--predictions {path} is not a readable MATLAB .mat file: {exc}") from None
    if MATLAB_VARIABLE not in contents:
        present = sorted(name for name, _, _ in scipy.io.whosmat(str(path)))
        raise UsageError(f"--predictions {path} has no variable '{MATLAB_VARIABLE}'; it holds {present}")
    return matlab_layout(np.asarray(contents[MATLAB_VARIABLE]), path)


def read_matlab_v73(path: Path) -> np.ndarray:
    import h5py


    with h5py.File(path, "r") as f:
        if MATLAB_VARIABLE not in f:
            raise UsageError(f"--predictions {path} has no variable '{MATLAB_VARIABLE}'; it holds {sorted(f)}")
        return np.asarray(f[MATLAB_VARIABLE][()]).T  # HDF5 stores MATLAB arrays with the dims reversed


def matlab_layout(array: np.ndarray, path: Path) -> np.ndarray:
    """(P, 2, N) -> (N, P, 2); MATLAB drops a trailing 1, so (P, 2) is one image."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[1] != 2 or not np.issubdtype(array.dtype, np.number):
        raise UsageError(f"--predictions {path}: '{MATLAB_VARIABLE}' has shape {array.shape} ({array.dtype}); "
                         f"expected (P joints, 2, N images) numbers")
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float64)


def read_npz(path: Path) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UsageError(f"--predictions {path} is not a readable NumPy file: {exc}") from None
    if isinstance(loaded, np.ndarray):
        return as_numbers(loaded, path)
    with loaded:
        keys = list(loaded.keys())
        if "predictions" not in keys and len(keys) != 1:
            raise UsageError(f"--predictions {path} has no array 'predictions'; it holds {keys}")
        return as_numbers(loaded["predictions" if "predictions" in keys else keys[0]], path)


def read_json(path: Path) -> np.ndarray:
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"--predictions {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        if "predictions" not in data:
            raise UsageError(f"--predictions {path}: a JSON object must hold 'predictions'; it holds {sorted(data)}")
        data = data["predictions"]
    if not isinstance(data, list) or not all(isinstance(image, list) for image in data):
        raise UsageError(f"--predictions {path}: expected a list of images, each a list of [x, y] joints")
    # A missing joint may be `null` instead of [x, y]; null coordinates become NaN.
    rows = [[[math.nan, math.nan] if joint is None else joint for joint in image] for image in data]
    return as_numbers(rows, path)


def read_csv(path: Path) -> np.ndarray:
    with path.open(newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if rows and not all(cell.strip() == "" or is_number(cell) for cell in rows[0]):
        rows = rows[1:]  # a header
    widths = {len(row) for row in rows}
    if not rows or len(widths) != 1 or widths.pop() % 2:
        raise UsageError(f"--predictions {path}: expected one row per image of 2P numbers (x_0, y_0, x_1, ...), "
                         f"all rows the same length")
    values = [[cell if cell.strip() else "nan" for cell in row] for row in rows]
    array = as_numbers(values, path)
    return array.reshape(len(rows), -1, 2)


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def as_numbers(values, path: Path) -> np.ndarray:
    """float64 array of `values` (None -> NaN), or UsageError for ragged or non-numeric input."""
    try:
        return np.array(values, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--predictions {path}: not an N x P x 2 array of numbers ({exc})") from None
