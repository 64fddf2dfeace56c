"""Each op's schema is written twice: for Python (uresnet_ops/<op>.py, ``define_op``: the public op
must exist without the compiled extension) and for C++ (csrc/<op>.h, the native kernel ops that
csrc/ops.cpp defines). These tests keep the two from drifting apart."""
import os

import pytest
import torch

from uresnet_ops import _library  # importing the package defines the public ops and loads the native ones

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Public op -> its native twin: a kernel op with the same arguments and returns, forward
# (_<op>_native) and backward (_<op>_native_backward).
TWINS = {
    "pixel_shuffle_bn": "_pixel_shuffle_bn_native",
    "multi_dilation_conv2d": "_multi_dilation_conv2d_native",
    "shuffle_upsample": "_shuffle_upsample_native",
}
# Public op -> the native stage kernels its twin composes (ops too, so that tests reach each one
# alone). Their arguments are the op's only in part.
STAGES = {
    "shuffle_upsample": ["_shuffle_upsample_conv_native", "_shuffle_upsample_conv_native_backward",
                         "_shuffle_upsample_bn_sums_native", "_shuffle_upsample_bn_backward_native"],
}
# Kernel ops shared by the ops, defined next to their kernel (csrc/running_stats.cpp).
SHARED = {"_update_running_stats"}
NATIVE_OPS = {n for twin in TWINS.values() for n in (twin, twin + "_backward")} | \
             {n for stages in STAGES.values() for n in stages} | SHARED

needs_extension = pytest.mark.skipif(not _library.HAS_EXTENSION, reason="extension not built")


def _registered(public):
    """Names of the uresnet_ops ops registered now: the public ones or the native ones."""
    names = {n.split("::", 1)[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("uresnet_ops::")}
    return {n for n in names if n.startswith("_") != public and not n.endswith("_python")}  # not the Python twins


def _schema(name):
    return getattr(torch.ops.uresnet_ops, name).default._schema


def _describe(arg):
    # What a caller depends on: type ("Optional[Tensor]" spells "Tensor?"), name, default, kind.
    write = arg.alias_info is not None and arg.alias_info.is_write
    return (f"{arg.type.annotation_str} {arg.name}" + (f"={arg.default_value!r}" if arg.has_default_value() else "")
            + (" (keyword-only)" if arg.kwarg_only else "") + (" (mutated)" if write else ""))


def differences(public, native):
    """What differs between two schemas other than their names, one line per difference."""
    out = []
    pa, na = [_describe(a) for a in public.arguments], [_describe(a) for a in native.arguments]
    for i in range(max(len(pa), len(na))):
        p = pa[i] if i < len(pa) else "(none)"
        n = na[i] if i < len(na) else "(none)"
        if p != n:
            out.append(f"argument {i}: Python {p!r} vs C++ {n!r}")
    pr = [r.type.annotation_str for r in public.returns]
    nr = [r.type.annotation_str for r in native.returns]
    if pr != nr:
        out.append(f"returns: Python ({', '.join(pr)}) vs C++ ({', '.join(nr)})")
    return out


def test_every_op_has_its_files_and_its_native_kernels_are_listed():
    """Same names across the layers: csrc/cuda/<op>.cu, csrc/cpu/<op>.cpp, csrc/<op>.h (which
    writes the schema of each of the op's native kernels), uresnet_ops/<op>.py."""
    public = {n for n in _registered(public=True) if not n.endswith("_backward")}
    assert public == set(TWINS), \
        "a public op is missing from TWINS/STAGES in tests/test_schemas.py (or listed there but gone)"
    for op in public:
        for rel in (f"csrc/{op}.h", f"csrc/cpu/{op}.cpp", f"csrc/cuda/{op}.cu", f"uresnet_ops/{op}.py"):
            assert os.path.exists(os.path.join(ROOT, rel)), f"{op}: no {rel}"
        with open(os.path.join(ROOT, "csrc", f"{op}.h")) as f:
            header = f.read()
        natives = [TWINS[op], TWINS[op] + "_backward", *STAGES.get(op, [])]
        for native in natives:
            assert f'"{native}(' in header, f"csrc/{op}.h does not hold the schema of {native}"


@needs_extension
def test_every_native_kernel_is_listed():
    assert _registered(public=False) == NATIVE_OPS, \
        "the native kernel ops (csrc/ops.cpp) differ from TWINS/STAGES/SHARED in tests/test_schemas.py"


@needs_extension
@pytest.mark.parametrize("phase", ["forward", "backward"])
@pytest.mark.parametrize("op", sorted(TWINS))
def test_native_twin_has_the_public_schema(op, phase):
    suffix = "_backward" if phase == "backward" else ""
    public, native = _schema(op + suffix), _schema(TWINS[op] + suffix)
    diff = differences(public, native)
    assert not diff, (f"uresnet_ops/{op}.py and csrc/{op}.h disagree on the schema of {public.name} / "
                      f"{native.name}:\n  " + "\n  ".join(diff))


@needs_extension
@pytest.mark.parametrize("op", sorted(STAGES))
def test_stage_kernels_use_the_public_types(op):
    """An argument a stage kernel shares by name with its public op has the op's type."""
    public = {}
    for name in (op, op + "_backward"):
        public.update({a.name: a.type.annotation_str for a in _schema(name).arguments})
    wrong = [f"{stage}: '{a.type.annotation_str} {a.name}', the public op has '{public[a.name]} {a.name}'"
             for stage in STAGES[op] for a in _schema(stage).arguments
             if a.name in public and a.type.annotation_str != public[a.name]]
    assert not wrong, "\n".join(wrong)


def test_the_check_reports_each_kind_of_drift():
    """The check itself: a reordered, retyped, dropped or defaulted argument and a changed return
    are each reported, by position and with both spellings."""
    base = ("(Tensor x, int upscale_factor, Tensor? weight, float eps, str activation) "
            "-> (Tensor, Tensor)")
    public = torch._C.parse_schema("uresnet_ops::op" + base)
    assert differences(public, torch._C.parse_schema("uresnet_ops::_op_native" + base)) == []
    cases = {
        "(Tensor x, Tensor? weight, int upscale_factor, float eps, str activation) -> (Tensor, Tensor)":
            ["argument 1: Python 'int upscale_factor' vs C++ 'Optional[Tensor] weight'",
             "argument 2: Python 'Optional[Tensor] weight' vs C++ 'int upscale_factor'"],
        "(Tensor x, int upscale_factor, Tensor weight, float eps, str activation) -> (Tensor, Tensor)":
            ["argument 2: Python 'Optional[Tensor] weight' vs C++ 'Tensor weight'"],
        "(Tensor x, int upscale_factor, Tensor? weight, float eps) -> (Tensor, Tensor)":
            ["argument 4: Python 'str activation' vs C++ '(none)'"],
        "(Tensor x, int upscale_factor, Tensor? weight, float eps, *, str activation='relu') -> (Tensor, Tensor)":
            ["argument 4: Python 'str activation' vs C++ \"str activation='relu' (keyword-only)\""],
        "(Tensor x, int upscale_factor, Tensor? weight, float eps, str activation) -> Tensor":
            ["returns: Python (Tensor, Tensor) vs C++ (Tensor)"],
    }
    for native, expected in cases.items():
        assert differences(public, torch._C.parse_schema("uresnet_ops::_op_native" + native)) == expected, native
