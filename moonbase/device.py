"""Device and dtype, chosen once: fp32 on CPU (bf16 is emulated and slow on AVX2), bf16 on CUDA. And the
CPU thread teams: see `release_cpu_threads`."""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES |= {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the short names


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def release_cpu_threads() -> None:
    """Let the calling thread's idle OpenMP worker threads exit.

    Every thread that runs torch ops on the CPU gets its own OpenMP team. Once a process holds more OpenMP
    threads than cores, libgomp stops spinning between parallel regions and every op pays a wake-up of its
    workers: on a 2-core machine the engine thread's small products ran at half speed while the thread
    that loaded the model kept its idle team. So a thread that hands its compute to the engine, and the
    engine thread when it goes idle, give their teams back (torch makes a new one on the next op)."""
    pause = _omp_pause()
    if pause is not None:
        pause(1)  # omp_pause_soft; a no-op for a thread without a team


@functools.cache
def _omp_pause() -> Callable[[int], int] | None:
    """libgomp's `omp_pause_resource_all` (torch's Linux wheels load it globally); None elsewhere."""
    if sys.platform != "linux" or "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        fn = ctypes.CDLL(None).omp_pause_resource_all
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


def ray_copies(ray, copies: int | None) -> tuple[int, dict[str, float]]:
    """How many copies of the model a Ray cluster runs (batch actors, Serve replicas) and each one's resources.

    Default: one per GPU, each holding its GPU; else one. On CPUs a copy holds its share of the cores: Ray sets
    a worker's OMP_NUM_THREADS to its `num_cpus`, so a copy reserving one CPU would run torch on one thread."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    copies = copies or max(gpus, 1)
    if gpus:
        return copies, {"num_gpus": 1, "num_cpus": 0}
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    share = max(1, min(int(sum(nodes) // copies), int(max(nodes, default=1))))
    return copies, {"num_gpus": 0, "num_cpus": share}
