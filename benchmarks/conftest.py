"""pytest-benchmark configuration for benchmarks/ (see README.md there for the commands).

* collects ``bench_*.py`` in this folder (no ``-o python_files=...`` needed);
* options ``--bench-size small|full``, ``--bench-device cpu|cuda``, ``--bench-dtype``,
  ``--bench-time``, ``--bench-compile`` (also from the environment: URESNET_BENCH_SIZE, URESNET_BENCH_DEVICE, ...);
* parametrizes each bench file's test (its module-level ``OP``) over case x mode x dtype x
  implementation, one ``benchmark.group`` per (op, shape, mode, dtype);
* times with ``benchmark.pedantic``: on CUDA each round flushes L2 (untimed), then runs the op
  between CUDA events and synchronises; the event median goes to ``extra_info["device_median_s"]``;
* adds the measured device ceilings (copy GB/s, matmul TFLOP/s) to the JSON's ``machine_info``.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

try:
    import uresnet_ops
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import uresnet_ops
from uresnet_ops import testing, timing

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases

_CUDA = torch.cuda.is_available()


def pytest_addoption(parser):
    group = parser.getgroup("uresnet benchmarks")
    env = os.environ.get
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=env("URESNET_BENCH_DEVICE"),
                    help="device to benchmark on (default: cuda when available, else cpu)")
    group.addoption("--bench-size", choices=("small", "full"), default=env("URESNET_BENCH_SIZE"),
                    help="shape set: full = the seeds' decoder/ASPP shapes (default on CUDA), "
                         "small = scaled down for CPUs (default on CPU)")
    group.addoption("--bench-dtype", default=env("URESNET_BENCH_DTYPE"),
                    help="comma-separated dtypes (default: float32,bfloat16 on CUDA, float32 on CPU)")
    group.addoption("--bench-time", type=float, default=env("URESNET_BENCH_TIME"),
                    help="seconds of timed rounds per benchmark (default: 1.0 full, 0.3 small)")
    group.addoption("--bench-compile", action="store_true", default=bool(env("URESNET_BENCH_COMPILE")),
                    help="bench_models.py: also torch.compile whole models on CPU (minutes per model and shape; "
                         "always on CUDA)")


@dataclasses.dataclass(frozen=True)
class Options:
    device: str
    size: str
    dtypes: tuple
    time: float


def _options(config) -> Options:
    device = config.getoption("bench_device") or ("cuda" if _CUDA else "cpu")
    if device == "cuda" and not _CUDA:
        raise pytest.UsageError("--bench-device cuda: no CUDA device is available")
    size = config.getoption("bench_size") or ("full" if device == "cuda" else "small")
    names = config.getoption("bench_dtype") or ("float32,bfloat16" if device == "cuda" else "float32")
    dtypes = []
    for name in names.split(","):
        dtype = getattr(torch, name.strip(), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise pytest.UsageError(f"--bench-dtype: unknown floating dtype {name!r}")
        dtypes.append(dtype)
    seconds = float(config.getoption("bench_time") or (1.0 if size == "full" else 0.3))
    return Options(device, size, tuple(dtypes), seconds)


def pytest_configure(config):
    _options(config)  # bad --bench-* options: a usage error before collection


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py here as test modules (unless python_files already matches them, or the
    file was named on the command line: pytest then collects it itself)."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and file_path.parent == Path(__file__).parent
            and not parent.session.isinitpath(file_path)
            and not any(fnmatch.fnmatch(file_path.name, p) for p in parent.config.getini("python_files"))):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@dataclasses.dataclass(frozen=True)
class Spec:
    case: cases.Case
    mode: str
    dtype: torch.dtype
    impl: str

    @property
    def id(self) -> str:
        return f"{self.case.label}-{self.mode}-{_dtype_name(self.dtype)}-{self.impl}"


def pytest_generate_tests(metafunc):
    if "spec" not in metafunc.fixturenames:
        return
    op = metafunc.module.OP
    opts = _options(metafunc.config)
    specs = [Spec(case, mode, dtype, impl)
             for case in cases.cases(op, opts.size, opts.device)
             for mode in case.modes()
             for dtype in opts.dtypes
             for impl in cases.implementations(op, opts.device)]
    metafunc.parametrize("spec", specs, ids=[s.id for s in specs])


@pytest.fixture(scope="session")
def bench_options(request) -> Options:
    return _options(request.config)


@pytest.fixture(scope="session")
def ceilings(bench_options) -> dict:
    """The device's measured copy bandwidth and matmul throughput, measured once."""
    return timing.device_ceilings(bench_options.device)


def pytest_benchmark_update_machine_info(config, machine_info):
    opts = _options(config)
    machine_info["uresnet"] = {
        "device": opts.device,
        "device_name": timing.device_name(opts.device),
        "bench_size": opts.size,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "extension_built": uresnet_ops._library.HAS_EXTENSION,
        "cuda_kernels_built": uresnet_ops._library.HAS_CUDA_KERNELS,
        "backends": {op: cases.implementations(op, opts.device)[:-2] for op in testing.OPS},
        "default_backend": {op: uresnet_ops.get_backend(op, opts.device).name for op in testing.OPS},
        "ceilings": timing.device_ceilings(opts.device),
        # CPU timings of eager chains depend on the allocator (fresh pages fault): record it.
        "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
        "cpu_isa_cap": os.environ.get("URESNET_CPU_ISA"),
    }


@pytest.fixture
def run_bench(benchmark, bench_options, ceilings):
    """``run_bench(spec)``: warm up (compiling where needed), then time ``spec`` with
    ``benchmark.pedantic`` and fill ``benchmark.group`` and ``benchmark.extra_info``."""

    def run(spec: Spec):
        case, mode, dtype, impl = spec.case, spec.mode, spec.dtype, spec.impl
        device = torch.device(bench_options.device)
        cuda = device.type == "cuda"
        benchmark.group = f"{case.op} {case.label} {mode} {_dtype_name(dtype)}"
        inputs = cases.build(case, mode, device, dtype)
        backend = impl not in testing.BASELINES
        fn, context = testing.implementation(case.op, impl)
        with context:
            try:
                step = testing.step_function(inputs.sample, fn, mode)
                step()  # compile, autotune, caches
            except Exception as error:
                if impl == testing.COMPILED:
                    pytest.skip(f"torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
                raise
            estimate = float("inf")  # the fastest of a few calls (robust to a busy machine)
            for _ in range(3):
                timing.synchronize(device)
                start = time.perf_counter()
                step()
                timing.synchronize(device)
                estimate = min(estimate, time.perf_counter() - start)
            rounds = int(min(max(math.ceil(bench_options.time / max(estimate, 1e-6)), 5), 10_000))
            peak = None
            if cuda:  # memory one step needs beyond its inputs (saved activations, temporaries)
                torch.cuda.synchronize(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                step()
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) - base

            events = []
            if cuda:
                flush = timing.l2_flusher(device)

                def setup():
                    flush()
                    torch.cuda.synchronize(device)

                def target():
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    step()
                    end.record()
                    torch.cuda.synchronize(device)
                    events.append((begin, end))

                benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1)
            else:
                benchmark.pedantic(step, rounds=rounds, warmup_rounds=1)
            last_used = uresnet_ops.backends.last_used
            used = [last_used(case.op, "forward")]
            if mode == "train_fwdbwd":
                used.append(last_used(case.op, "backward"))

        info = benchmark.extra_info
        info.update(op=case.op, shape=list(case.x_shape), case=case.label, params={k: v for k, v in case.params},
                    mode=mode, dtype=_dtype_name(dtype), implementation=impl, device=device.type,
                    device_name=ceilings["device"], torch_version=torch.__version__, bench_size=bench_options.size,
                    bytes=inputs.bytes[mode], flops=inputs.flops[mode],
                    useful_flops=inputs.useful_flops[mode], rounds=rounds,
                    timer="perf_counter+cuda_sync" if cuda else "perf_counter")
        if backend:
            # A backend may decline an argument combination (or have no backward): say what ran.
            info["backend_ran"] = used[0] if len(set(used)) == 1 else "/".join(map(str, used))
        if peak is not None:
            info["peak_mem_bytes"] = peak
        if events:
            info["device_median_s"] = statistics.median(b.elapsed_time(e) / 1e3 for b, e in events[1:] or events)
            info["device_timer"] = "cuda_event"

    return run


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _version(module: str):
    try:
        return __import__(module).__version__
    except ImportError:
        return None
