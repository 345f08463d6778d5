"""Dataset readers (LSPET, LSP, MPII, embedded synthetic) behind one small interface; each kind's
entry (reader, joint set, scoring protocol, crop ratio) in registry.py."""
from .base import DatasetError, PoseDataset, PoseSample, SampleSkipped
from .lsp import LSPDataset
from .lspet import LSPETDataset
from .mpii import MPIIDataset
from .splits import ALL_SPLITS, SPLITS, hash_bucket, hashed_split_indices, split_of_name

__all__ = [
    "DatasetError", "PoseDataset", "PoseSample", "SampleSkipped",
    "LSPDataset", "LSPETDataset", "MPIIDataset",
    "SPLITS", "ALL_SPLITS", "hash_bucket", "hashed_split_indices", "split_of_name",
]
