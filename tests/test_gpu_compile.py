"""The sm_90 compile gate, without a GPU: every Triton kernel in every launch configuration and
every CUDA kernel compile for sm_90, without register spills (scripts/gpu_resources.py; the
interpreter accepts code that the GPU compiler rejects). About 6 minutes on 2 cores (12 when busy), and
about half that again for the Triton kernels' registers and spills with the oldest supported
Triton, 3.6 (the GPU machine's: its bundled ptxas 12.8 spills where 3.8's does not), installed
apart in build/triton36 by .ci/run."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
TRITON_36 = os.path.join(ROOT, "build", "triton36")  # pip install --no-deps --target build/triton36 triton==3.6.0


def run_gate(what, *options, triton_path=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    if triton_path:  # this Triton first, before the installed one
        env["PYTHONPATH"] = os.pathsep.join([triton_path, *filter(None, [env.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, "scripts/gpu_resources.py", what, *options], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1200)
    failures = [line for line in result.stderr.splitlines() if line.startswith("FAIL")]
    assert result.returncode == 0, "\n".join(failures) or result.stderr[-4000:]
    return result.stdout


def test_every_triton_kernel_compiles_for_sm90_without_spills():
    pytest.importorskip("triton")
    report = run_gate("triton")
    assert "pixel_shuffle_bn._stats_kernel" in report and "multi_dilation_conv2d._grad_w_kernel" in report


@pytest.mark.skipif(not os.path.isdir(os.path.join(TRITON_36, "triton")),
                    reason="triton 3.6 is not in build/triton36 (.ci/run installs it: "
                           "pip install --no-deps --target build/triton36 triton==3.6.0)")
def test_every_triton_kernel_compiles_for_sm90_without_spills_with_triton_36():
    # Registers and spills only: the machine-code needs are checked with the pinned Triton above.
    report = run_gate("triton", "--spills-only", triton_path=TRITON_36)
    assert "compiled with triton 3.6." in report and "multi_dilation_conv2d._grad_x_kernel" in report


@pytest.mark.skipif(torch.version.cuda is None or not os.path.exists(NVCC),
                    reason="needs the CUDA build of torch and nvcc")
def test_every_cuda_kernel_compiles_for_sm90_without_spills():
    report = run_gate("cuda")
    assert report.count("| `") >= 3  # a row per kernel instantiation


def test_machine_code_profile_reads_sass_and_ptx():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gpu_resources
    sass = """
        /*0040*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0050*/               @P0 LDG.E.U16 R9, desc[UR4][R6.64] ;
        /*0060*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;
        /*0070*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0080*/                   STG.E.U16 desc[UR4][R2.64], R5 ;
    """
    ptx = "div.s64 %rd4, %rd2, %rd3;\n rem.u64 %rd5, %rd2, %rd3;\n div.rn.f32 %f1, %f2, %f3;"
    profile = gpu_resources.machine_code_profile(sass, ptx)
    assert profile == dict(ldg_bits=128, stg_bits=16, hgmma=1, hmma=0, async_copies=1, div64=2, instructions=5)


def test_cuda_machine_code_is_split_per_kernel():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gpu_resources
    sass = """
        Function : _Z3fooPf
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*10000*/                  HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        Function : _Z3barPf
        /*0000*/                   LDG.E.U16 R4, desc[UR4][R2.64] ;
    """
    ptx = ".visible .entry _Z3fooPf(\n div.u64 %rd1, %rd2, %rd3;\n}\n.entry _Z3barPf(\n div.u32 %r1, %r2, %r3;\n}"
    functions = gpu_resources._functions(sass, r"^\s*Function : (\S+)")
    entries = gpu_resources._functions(ptx, r"^(?:\.visible |\.weak )*\.entry (\w+)\(")
    assert set(functions) == set(entries) == {"_Z3fooPf", "_Z3barPf"}
    foo = gpu_resources.machine_code_profile(functions["_Z3fooPf"], entries["_Z3fooPf"])
    bar = gpu_resources.machine_code_profile(functions["_Z3barPf"], entries["_Z3barPf"])
    # the HMMA at a 5-digit address counts too
    assert (foo["ldg_bits"], foo["hmma"], foo["div64"], foo["instructions"]) == (128, 1, 1, 2)
    assert (bar["ldg_bits"], bar["hmma"], bar["div64"]) == (16, 0, 0)
    assert gpu_resources._cuda_kernel_label("void conv_gemm_kernel<Half, WmmaEngine<Half>, (Epilogue)0>") == \
        ("conv_gemm_kernel", "float16 WmmaEngine<Half> (Epilogue)0")


def test_a_backend_that_misses_a_design_need_is_not_the_default():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gpu_resources
    from uresnet_ops.backends import DEFAULT_ORDER
    first = DEFAULT_ORDER["multi_dilation_conv2d"]["cuda"][0]
    assert gpu_resources.default_order_check(first, {"multi_dilation_conv2d"}) != []
    assert gpu_resources.default_order_check("cuda", {"multi_dilation_conv2d", "pixel_shuffle_bn"}) == []
