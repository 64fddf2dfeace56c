"""The one GPU call (scripts/gpu_check.sh), rehearsed without a GPU: every step's command line
parses, every pytest selection collects the cases it must (as the GPU machine would), the Triton
kernel runs split into processes cover every call, the sanitizer filters name every kernel, the
bench selection finds one shape per op, and at most 8 files would come back. About 1-2 minutes
on 2 cores (pytest collections, each importing torch)."""
import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rehearse(script, *parts, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    return subprocess.run(["bash", script, "--rehearse", *parts], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_rehearsal_of_every_step_passes():
    result = rehearse("scripts/gpu_check.sh")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    for part in ("build", "kernels", "tests", "memcheck", "bench", "files"):
        assert f"[rehearse {part}] ok" in result.stdout
    assert "big: 12 cases (expected 12)" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("gpu_check --rehearse: every step passed")


def test_rehearsal_fails_on_a_selection_that_misses_cases(tmp_path):
    # A copy of the script whose big-test selection matches nothing and whose Triton processes
    # leave one op out: both parts must fail here, not on the GPU machine.
    (tmp_path / "scripts").mkdir()
    script = (open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
              .replace('BIG=(tests/test_cuda.py -k "2_pow_31")', 'BIG=(tests/test_cuda.py -k "2_pow_32")')
              .replace("OPS=(pixel_shuffle_bn shuffle_upsample multi_dilation_conv2d)",
                       "OPS=(pixel_shuffle_bn shuffle_upsample)"))
    assert script.count("2_pow_32") == 1 and "OPS=(pixel_shuffle_bn shuffle_upsample)\n" in script
    (tmp_path / "scripts" / "gpu_check.sh").write_text(script)
    for name in ("run_each_kernel.py", "collect_as_on_cuda.py"):
        shutil.copy(os.path.join(ROOT, "scripts", name), tmp_path / "scripts" / name)
    for name in ("tests", "uresnet_ops", "pyproject.toml"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    result = rehearse(str(tmp_path / "scripts" / "gpu_check.sh"), "kernels", "tests", cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-4000:]
    assert "[rehearse kernels] FAILED" in result.stdout and "[rehearse tests] FAILED" in result.stdout
    assert "big: 0 cases (expected 12)" in result.stdout


def test_unknown_argument_is_refused():
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--rehears"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "unknown argument '--rehears'" in result.stderr
