"""What the hardware did during an epoch, for the epoch's row: the worker process's CPU use and peak
memory, and on CUDA the GPU's peak memory and (with pynvml installed) its utilisation.

Nothing here touches the training step: CPU time is read from the kernel's accounting of this
process, and GPU utilisation from the samples NVML's driver keeps (read once an epoch).
"""

from __future__ import annotations

import resource
import time

import torch

CPU_PERCENT = "sys_cpu_percent"  # CPU time / wall time of the worker process, 100 = one core busy
PEAK_RSS_MB = "sys_peak_rss_mb"  # the worker process's peak resident memory so far
GPU_PEAK_MEMORY_MB = "sys_gpu_peak_memory_mb"  # peak memory PyTorch allocated on the GPU in the epoch
GPU_UTIL_PERCENT = "sys_gpu_util_percent"  # mean of NVML's utilisation samples in the epoch (pynvml only)
GPU_MEMORY_USED_MB = "sys_gpu_memory_used_mb"  # the GPU's used memory, all processes (pynvml only)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


class SystemSampler:
    """`epoch_figures()` returns the figures since the previous call (or since construction)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._wall, self._cpu = time.monotonic(), _cpu_seconds()
        self._nvml = _nvml_handle(self.device) if self.device.type == "cuda" else None
        self._last_sample_us = 0  # NVML timestamp of the newest utilisation sample read

    def epoch_figures(self) -> dict[str, float]:
        wall, cpu = time.monotonic(), _cpu_seconds()
        figures = {CPU_PERCENT: 100.0 * (cpu - self._cpu) / max(wall - self._wall, 1e-9),
                   PEAK_RSS_MB: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}  # Linux: KiB
        self._wall, self._cpu = wall, cpu
        if self.device.type == "cuda":
            figures[GPU_PEAK_MEMORY_MB] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
            torch.cuda.reset_peak_memory_stats(self.device)
        if self._nvml is not None:
            figures.update(self._nvml_figures())
        return figures

    def _nvml_figures(self) -> dict[str, float]:
        import pynvml

        figures = {GPU_MEMORY_USED_MB: pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used / 2 ** 20}
        try:  # the driver's ring buffer of utilisation samples newer than the last one read
            _, samples = pynvml.nvmlDeviceGetSamples(self._nvml, pynvml.NVML_GPU_UTILIZATION_SAMPLES,
                                                     self._last_sample_us)
        except pynvml.NVMLError:  # no sample since the last read, or not supported by this GPU
            return figures
        if samples:
            self._last_sample_us = max(sample.timeStamp for sample in samples)
            figures[GPU_UTIL_PERCENT] = sum(sample.sampleValue.uiVal for sample in samples) / len(samples)
        return figures


def _nvml_handle(device: torch.device):
    """NVML's handle of the device, or None without pynvml or a driver (then no utilisation)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        # By UUID: NVML counts every GPU of the machine, PyTorch only those CUDA_VISIBLE_DEVICES shows.
        uuid = f"GPU-{torch.cuda.get_device_properties(index).uuid}"
        return pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception:  # noqa: BLE001 - missing package, library or device: the figures are optional
        return None
