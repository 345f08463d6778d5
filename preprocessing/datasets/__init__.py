"""Dataset readers (LSPET, LSP, MPII, embedded synthetic) behind one small interface."""
from .base import DatasetError, PoseDataset, PoseSample, SampleSkipped

__all__ = ["DatasetError", "PoseDataset", "PoseSample", "SampleSkipped"]
