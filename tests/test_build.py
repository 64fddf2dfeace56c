"""The compiled extension: present when it should be, and the package works without it."""
import os
import subprocess
import sys

import pytest
import torch

import uresnet_ops
from uresnet_ops import _library


@pytest.mark.skipif(os.environ.get("URESNET_REQUIRE_EXTENSION") != "1",
                    reason="set URESNET_REQUIRE_EXTENSION=1 where the extension must have been built (CI)")
def test_extension_was_built():
    assert _library.HAS_EXTENSION, "uresnet_ops._C failed to import"
    wanted = os.environ.get("URESNET_CUDA", "")  # setup.py: "1" builds them, unset only where a GPU is visible
    if torch.version.cuda is not None and (wanted == "1" or (wanted == "" and torch.cuda.is_available())):
        assert _library.HAS_CUDA_KERNELS, "the CUDA kernels were not compiled into uresnet_ops._C"
    assert "cpu" in uresnet_ops.available_backends("pixel_shuffle_bn")


@pytest.mark.skipif(os.environ.get("URESNET_REQUIRE_EXTENSION") != "1" or os.environ.get("URESNET_BUILD_DIR"),
                    reason="after scripts/setup.sh in this checkout (CI), with the default build folder")
def test_build_keeps_its_objects_for_an_incremental_rebuild():
    # pip's editable build used a fresh temporary folder each time and recompiled every file
    # (2-3 minutes); setup.py keeps the objects and ninja's build file in build/temp.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    temp = os.path.join(root, "build", "temp")
    assert os.path.exists(os.path.join(temp, "build.ninja")), f"no build.ninja in {temp}"
    sources = ["csrc/ops.cpp"] + [f"csrc/{folder}/{name}" for folder in ("cpu", "cuda")
                                  for name in os.listdir(os.path.join(root, "csrc", folder))
                                  if name.endswith(".cpp") or (name.endswith(".cu") and _library.HAS_CUDA_KERNELS)]
    objects = [os.path.join(d, f) for d, _, files in os.walk(temp) for f in files if f.endswith(".o")]
    missing = [src for src in sources if not any(src.rsplit(".", 1)[0] + "." in o for o in objects)]
    assert not missing, f"no object file kept for {missing} in {temp}"


@pytest.mark.skipif(not _library.HAS_EXTENSION, reason="extension not built")
def test_native_kernel_ops_are_registered():
    op = torch.ops.uresnet_ops._pixel_shuffle_bn_native.default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")
    if _library.HAS_CUDA_KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")


def test_native_kernel_checks_its_arguments():
    if not _library.HAS_EXTENSION:
        pytest.skip("extension not built")
    native = torch.ops.uresnet_ops._pixel_shuffle_bn_native
    x, c = torch.randn(2, 8, 3, 3), torch.ones(2)
    with pytest.raises(ValueError, match="upscale_factor"):
        native(x, 3, c, c, c, c, False, 1e-5, "relu", 0.0)
    with pytest.raises(ValueError, match="activation"):
        native(x, 2, c, c, c, c, False, 1e-5, "gelu", 0.0)
    with pytest.raises(ValueError, match="running_var"):
        native(x, 2, c, c, c, torch.ones(3), False, 1e-5, "relu", 0.0)


def test_package_works_without_the_extension():
    code = ("import sys, warnings; sys.modules['uresnet_ops._C'] = None\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); import uresnet_ops, torch\n"
            "messages = [str(m.message) for m in w]\n"
            "assert sum('compiled kernels not available' in m for m in messages) == 1, messages\n"
            "assert 'cpu' not in uresnet_ops.available_backends()\n"
            "x = torch.randn(2, 8, 3, 3); c = torch.ones(2)\n"
            "uresnet_ops.pixel_shuffle_bn(x, 2, c, c, c, c, training=False)\n"
            "print(uresnet_ops.backends.last_used('pixel_shuffle_bn'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reference"


@pytest.mark.skipif(not _library.HAS_EXTENSION, reason="extension not built")
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_capped_isa_kernels_match_reference(isa):
    """The CPU kernels run AVX-512 / AVX2 clones where the CPU has them; URESNET_CPU_ISA caps the
    choice, and every level must compute the same (in a subprocess: the choice is made once)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    # The subprocess runs in tests/: PYTHONPATH makes it import this checkout, as the caller does,
    # not whichever uresnet_ops is installed (or none).
    path = os.pathsep.join(p for p in (os.path.dirname(tests), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         os.path.join(tests, "test_shuffle_upsample.py"), os.path.join(tests, "test_pixel_shuffle_bn.py"),
         "-k", "batch_norm_passes_match_formula or (matches_reference and cpu and contiguous and float32)"],
        capture_output=True, text=True, timeout=600, cwd=tests,
        env={**os.environ, "URESNET_CPU_ISA": isa, "TRITON_INTERPRET": "0", "PYTHONPATH": path})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
