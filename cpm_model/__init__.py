"""Convolutional Pose Machines in plain PyTorch and NumPy (no Ray, MLflow or h5py here)."""
