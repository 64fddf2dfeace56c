"""Small timing helpers shared by the CLI (`uresnet bench`, `uresnet demo`) and benchmarks/.

    from uresnet_ops.timing import measure, device_ceilings
    measure(lambda: op(x), device="cuda")["median_s"]
    device_ceilings("cuda")  # {"copy_GBps": ..., "matmul_TFLOPs": ..., ...}

On CUDA each call is timed with CUDA events (median, as ``triton.testing.do_bench``), with an
optional L2 flush before every call and rotating input sets; on CPU with ``time.perf_counter``.
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Callable, Sequence

import torch

__all__ = ["measure", "device_ceilings", "synchronize", "l2_flusher", "device_name"]


def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def synchronize(device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    device = _device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    device = _device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine() or "cpu"


def l2_flusher(device) -> Callable[[], None]:
    """A function that evicts the device's L2 cache (zeroes a buffer twice its size; CUDA), or a
    no-op (CPU)."""
    device = _device(device)
    if device.type != "cuda":
        return lambda: None
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
    buffer = torch.empty(max(2 * l2, 64 * 2**20) // 4, dtype=torch.int32, device=device)
    return buffer.zero_


def measure(fn: Callable, *, device="cpu", warmup: int | float = 3, reps: int | None = None,
            min_time: float = 0.2, max_reps: int = 10_000, inputs: Sequence[tuple] | None = None,
            flush_l2: bool = False) -> dict:
    """Time ``fn()`` (or ``fn(*inputs[i % len(inputs)])``, rotating input sets so that a large
    working set is not served from cache) and return ``{"median_s", "mean_s", "min_s", "max_s",
    "reps", "timer"}``.

    ``warmup``: calls before timing (an int), or seconds of calls (a float), which also absorbs
    ``torch.compile``. ``reps``: timed calls; by default as many as fit in ``min_time`` seconds
    (at least 5). ``flush_l2``: evict L2 before every timed call (CUDA; outside the timed
    interval). On CUDA every call is bracketed by CUDA events and the device is synchronised.
    """
    device = _device(device)
    cuda = device.type == "cuda"
    args = list(inputs) if inputs else [()]
    flush = l2_flusher(device) if flush_l2 else (lambda: None)
    step = 0

    def call():
        nonlocal step
        fn(*args[step % len(args)])
        step += 1

    # Warm up, and (unless ``reps`` is given) estimate one call's time to choose the repetitions.
    synchronize(device)
    start = time.perf_counter()
    count = 0
    while (count < warmup) if isinstance(warmup, int) else (count < 1 or time.perf_counter() - start < warmup):
        call()
        count += 1
    if reps is None:
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        estimate = max(time.perf_counter() - start, 1e-7)
        reps = int(min(max(min_time / estimate, 5), max_reps))

    times = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for begin, end in events:
            flush()
            begin.record()
            call()
            end.record()
        synchronize(device)
        times = [begin.elapsed_time(end) / 1e3 for begin, end in events]
    else:
        for _ in range(reps):
            flush()
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "min_s": min(times), "max_s": max(times), "reps": reps,
            "timer": "cuda_event" if cuda else "perf_counter"}


@functools.lru_cache(maxsize=None)
def _ceilings(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    # Copy bandwidth: a large copy, counted as read + write.
    numel = (1 << 28) if cuda else (1 << 25)  # 1 GiB / 128 MiB of float32
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), device=device, warmup=2, min_time=0.3 if cuda else 0.5)
    # Matmul throughput: bf16 on CUDA, float32 on CPU.
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    mm = measure(lambda: torch.mm(a, b, out=out), device=device, warmup=3, min_time=0.3 if cuda else 0.5)
    # A ceiling is what the device can reach: the best call, not the median.
    return {"device": device_name(device), "copy_GBps": 2 * numel * 4 / copy["min_s"] / 1e9,
            "matmul_TFLOPs": 2 * n**3 / mm["min_s"] / 1e12, "matmul_dtype": str(dtype).replace("torch.", ""),
            "matmul_n": n, "threads": torch.get_num_threads()}


def device_ceilings(device="cpu") -> dict:
    """Measured ceilings of ``device`` (best of many calls): ``copy_GBps`` (a large
    device-to-device copy, read + write) and ``matmul_TFLOPs`` (a large bf16 matmul on CUDA,
    float32 on CPU). Cached per device."""
    return dict(_ceilings(_device(device)))
