"""What the hardware did during an epoch, for the epoch's row: the worker process's CPU use and peak
memory, and on CUDA the GPU's peak memory and (with pynvml installed) its utilisation.

Nothing here touches the training step: CPU time is read from the kernel's accounting of this
process, and GPU utilisation is sampled by a background thread through NVML.
"""

from __future__ import annotations

import resource
import threading
import time

import torch

CPU_PERCENT = "sys_cpu_percent"  # CPU time / wall time of the worker process, 100 = one core busy
PEAK_RSS_MB = "sys_peak_rss_mb"  # the worker process's peak resident memory so far
GPU_PEAK_MEMORY_MB = "sys_gpu_peak_memory_mb"  # peak memory PyTorch allocated on the GPU in the epoch
GPU_UTIL_PERCENT = "sys_gpu_util_percent"  # mean NVML utilisation over the epoch (pynvml only)
GPU_MEMORY_USED_MB = "sys_gpu_memory_used_mb"  # the GPU's used memory, all processes (pynvml only)
NVML_PERIOD_S = 1.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


class SystemSampler:
    """`epoch_figures()` returns the figures since the previous call (or since construction)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._wall, self._cpu = time.monotonic(), _cpu_seconds()
        self._gpu_samples: list[float] = []
        self._nvml = _nvml_handle(self.device) if self.device.type == "cuda" else None
        self._stop = threading.Event()
        if self._nvml is not None:
            threading.Thread(target=self._sample_gpu, name="nvml-sampler", daemon=True).start()

    def _sample_gpu(self) -> None:
        import pynvml

        while not self._stop.wait(NVML_PERIOD_S):
            try:
                self._gpu_samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(self._nvml).gpu))
            except pynvml.NVMLError:  # the driver went away: no more samples, training goes on
                return

    def epoch_figures(self) -> dict[str, float]:
        wall, cpu = time.monotonic(), _cpu_seconds()
        figures = {CPU_PERCENT: 100.0 * (cpu - self._cpu) / max(wall - self._wall, 1e-9),
                   PEAK_RSS_MB: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}  # Linux: KiB
        self._wall, self._cpu = wall, cpu
        if self.device.type == "cuda":
            figures[GPU_PEAK_MEMORY_MB] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
            torch.cuda.reset_peak_memory_stats(self.device)
        if self._nvml is not None:
            import pynvml

            samples, self._gpu_samples = self._gpu_samples, []
            if samples:
                figures[GPU_UTIL_PERCENT] = sum(samples) / len(samples)
            figures[GPU_MEMORY_USED_MB] = pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used / 2 ** 20
        return figures

    def close(self) -> None:
        self._stop.set()


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
