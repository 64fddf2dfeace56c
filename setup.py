"""Builds the native extension ``uresnet_ops._C`` (package metadata lives in pyproject.toml).

Install into an environment that already has torch, without build isolation, so that the
extension is compiled against that torch:

    pip install --no-build-isolation .        # or: pip install --no-build-isolation -e .

Environment switches:
    URESNET_CUDA=0|1          0: CPU kernels only; 1: the CUDA kernels must build (else fail),
                              GPU or not (CI sets it: it compiles and checks them); unset: build
                              them only when a GPU is visible (torchvision's FORCE_CUDA rule).
    URESNET_NO_EXTENSION=1    install the pure-Python packages only (no compiled kernels).
    TORCH_CUDA_ARCH_LIST      GPU architectures (default "8.0;9.0": A100, H100).
    MAX_JOBS                  parallel compile jobs (default 2).
    CUDA_HOME                 CUDA toolkit root (default /usr/local/cuda when that exists).
    URESNET_BUILD_DIR         object files kept between builds (default build/temp): ninja
                              recompiles only what changed.
"""
import glob
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
INSTALL_HINT = ("install torch first, then build without build isolation:\n"
                "    pip install --no-build-isolation .      (or: pip install --no-build-isolation -e .)")


def warn(message):
    print(f"\n*** uresnet setup.py WARNING: {message}\n", file=sys.stderr, flush=True)


def import_installed_torch():
    """The installed torch; exit at once when there is none or it is a build-isolation copy."""
    try:
        import torch
    except ImportError:
        sys.exit("uresnet: torch is not importable while building (pip's build isolation hides the "
                 "installed torch, and pyproject.toml deliberately does not pull one in).\n" + INSTALL_HINT)
    path = Path(os.path.realpath(torch.__file__))
    in_temp = str(path).startswith(os.path.realpath(tempfile.gettempdir()))
    if any(part.startswith(("pip-build-env", "build-env-")) for part in path.parts) or \
            (in_temp and "overlay" in path.parts):
        sys.exit(f"uresnet: torch was imported from a temporary build environment ({path}), not the "
                 "installed torch the extension must be compiled against.\n" + INSTALL_HINT)
    return torch


def cxx_compiler_works():
    """Whether the C++ compiler setuptools will use can compile a tiny file."""
    cxx = shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        Path(src).write_text("#include <vector>\nint probe() { return int(std::vector<int>(3).size()); }\n")
        try:
            return subprocess.run([*cxx, "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                  capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def no_extension(reason):
    stale = glob.glob("uresnet_ops/_C.*", root_dir=HERE)
    warn(f"{reason}: installing WITHOUT the compiled kernels (uresnet_ops falls back to its "
         "reference/Triton backends)." + (f" Note: an editable install still loads the earlier build "
                                          f"{stale[0]}; delete it to really go without." if stale else ""))
    return {}


def extension_setup():
    """``setup()`` keyword arguments for the extension (empty when none is built)."""
    if os.environ.get("URESNET_NO_EXTENSION") == "1":
        return no_extension("URESNET_NO_EXTENSION=1")
    want_cuda = os.environ.get("URESNET_CUDA", "").strip()
    if want_cuda not in ("", "0", "1"):
        sys.exit(f"uresnet: URESNET_CUDA must be 0, 1 or unset, got {want_cuda!r}")
    torch = import_installed_torch()
    if not cxx_compiler_works():
        if want_cuda == "1":
            sys.exit("uresnet: URESNET_CUDA=1 but no working C++ compiler was found (set CXX).")
        return no_extension("no working C++ compiler found (install g++ or set CXX, then reinstall)")

    # Must be set before torch.utils.cpp_extension is imported (it reads CUDA_HOME on import).
    if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", "2")
    from torch.utils import cpp_extension

    nvcc = cpp_extension.CUDA_HOME and os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    no_cuda_reason = ("torch is a CPU-only build" if torch.version.cuda is None else
                      None if nvcc and os.path.exists(nvcc) else
                      f"no nvcc under CUDA_HOME={cpp_extension.CUDA_HOME} (set CUDA_HOME to the toolkit root)")
    if want_cuda == "1" and no_cuda_reason:
        sys.exit(f"uresnet: URESNET_CUDA=1 but the CUDA kernels cannot be built: {no_cuda_reason}.")
    # Compiling the CUDA kernels takes most of the build (~10 minutes on 2 cores): not for a
    # machine that cannot run them, unless asked.
    gpu_visible = torch.version.cuda is not None and torch.cuda.is_available()
    with_cuda = no_cuda_reason is None and (want_cuda == "1" or (want_cuda == "" and gpu_visible))
    if want_cuda == "" and gpu_visible and no_cuda_reason:
        warn(f"a GPU is visible but only the CPU kernels are built: {no_cuda_reason}.")
    elif not with_cuda:
        print("uresnet setup.py: building the CPU kernels only (" + (
            "URESNET_CUDA=0" if want_cuda == "0" else "no GPU visible; URESNET_CUDA=1 builds the CUDA kernels too")
            + ")", file=sys.stderr, flush=True)

    sources = ["csrc/ops.cpp", "csrc/running_stats.cpp", *sorted(glob.glob("csrc/cpu/*.cpp", root_dir=HERE)),
               *sorted(glob.glob("csrc/autograd/*.cpp", root_dir=HERE))]
    # No -std flag: torch's cpp_extension adds the standard its headers need (C++17 for older
    # torch, C++20 for torch 2.14); the sources are valid C++17. -g0 drops the -g that Python's
    # CFLAGS add: it cuts C++ compile time by ~40%. -fopenmp: at::parallel_for is a header
    # template over `#pragma omp parallel`; without the flag every CPU kernel runs on one thread.
    compile_args = {"cxx": ["-O3", "-g0", "-fopenmp"]}
    kwargs = {}
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu", root_dir=HERE))
        compile_args["nvcc"] = ["-O3"]
        kwargs["define_macros"] = [("URESNET_WITH_CUDA", None)]
        # cusparse.h / cublas_v2.h (needed by ATen/cuda/CUDAContext.h) come with torch's nvidia-* wheels.
        site = os.path.dirname(os.path.dirname(torch.__file__))
        kwargs["include_dirs"] = [d for d in (os.path.join(site, "nvidia", v, "include") for v in ("cu13", "cu12"))
                                  if os.path.isdir(d)]
    make = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    extension = make("uresnet_ops._C", sources, extra_compile_args=compile_args, extra_link_args=["-fopenmp"],
                     **kwargs)
    base = cpp_extension.BuildExtension.with_options(use_ninja=cpp_extension.is_ninja_available())

    class build_ext(base):
        """Object files (and ninja's build.ninja) in a persistent folder: pip's (editable) builds
        otherwise use a fresh temporary one each time and recompile everything; here an
        unchanged source tree relinks in seconds. ``URESNET_BUILD_DIR`` moves it."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.environ.get("URESNET_BUILD_DIR") or os.path.join(HERE, "build", "temp")

    return {"ext_modules": [extension], "cmdclass": {"build_ext": build_ext}}


setup(**extension_setup())
