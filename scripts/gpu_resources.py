"""Compile every GPU kernel of uresnet_ops for sm_90 on a machine without a GPU, and report the
registers, stack/spill bytes and shared memory of each kernel and configuration.

    python scripts/gpu_resources.py triton [--jobs N]   # every @triton.jit kernel, every config
    python scripts/gpu_resources.py triton --spills-only # registers and spills only (no SASS: half the time)
    python scripts/gpu_resources.py cuda   [--jobs N]   # csrc/cuda/*.cu with nvcc -Xptxas -v
    python scripts/gpu_resources.py all --write docs/gpu_resources.md   # regenerate the report

Triton: each kernel of uresnet_ops/triton/ (a module-level @triton.jit function whose name ends
in ``_kernel``) is compiled for GPUTarget("cuda", 90, 32) down to cubin by Triton's own bundled
ptxas: a stand-in driver reports that target, and ``kernel.warmup(..., grid=(1,))`` compiles with
``MockTensor`` pointer arguments. Every constexpr combination the host code launches with, every
autotune config, every dtype the backend accepts (LAUNCHES below mirrors the host code and uses
its own block-size helpers). ``cuobjdump -res-usage`` (bundled with Triton) reads the cubin.

CUDA: each .cu file is compiled device-only (``nvcc -cubin``, no host pass) for sm_90 with
``-Xptxas -v``; the ptxas lines give registers, spill stores/loads, stack frame and shared memory
per kernel instantiation.

Machine code: ``cuobjdump -sass`` of each Triton cubin and of each .cu file's cubin per kernel
(and their PTX) gives the widest global load/store, tensor-core instructions (HGMMA, HMMA),
asynchronous copies (LDGSTS, TMA) and 64-bit divisions; DESIGN_NEEDS and CUDA_DESIGN_NEEDS list
the properties each kernel's design needs, reported met or missing, and the gate fails when a
kernel loses one it has (``required``) and when a backend that misses one is the default on CUDA.

Exit status 1 on any compile error, on a kernel without a configuration here, on any stack
or spill bytes (a kept configuration must not spill), on a lost required property and on a
default CUDA backend that misses a need. The report
is markdown on stdout or in --write's file (sections for what was asked; ``all`` writes both).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import importlib
import itertools
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_ARCH = 90


# ---- Triton ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    kernel: str  # "module.kernel"
    label: str   # what distinguishes this launch in the report
    args: tuple  # positional arguments: torch dtypes stand for pointers (MockTensor)
    constexprs: dict


def _triton_setup():
    """Import the kernels compiled for sm_90 (not interpreted) with a stand-in driver."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("gpu_resources: TRITON_INTERPRET=1 is set; the kernels must be compiled, not interpreted")
    sys.path.insert(0, ROOT)
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class StandInDriver:
        """What JITFunction.run(warmup=True) asks of the active driver, for a device that is not here."""
        target = GPUTarget("cuda", TARGET_ARCH, 32)

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

    driver.set_active(StandInDriver())
    import uresnet_ops.triton
    # Every module of the package (the ops' and _common's), so that a kernel anywhere is covered.
    names = [info.name for info in pkgutil.iter_modules(uresnet_ops.triton.__path__)]
    return torch, triton, {name: importlib.import_module(f"uresnet_ops.triton.{name}") for name in names}


def _strides(shape, channels_last):
    _, c, h, w = shape
    return (c * h * w, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)


def _launches(torch, triton, modules):
    """The launch configurations of every Triton kernel, as the host code makes them: every dtype
    each backend accepts, with every value of every constexpr and every autotune config. To keep
    CI short, the epilogue-only constexprs (ACTIVATION, HAS_BIAS) take all their values at one
    scale factor / tile config, the others with the heaviest epilogue (silu); channels_last
    strides (Triton specialises a stride of 1: the other position compiles differently) in
    float32 only."""
    f32, f64 = torch.float32, torch.float64
    half_dtypes = (torch.float16, torch.bfloat16)
    activations = ("none", "relu", "leaky_relu", "silu")
    out = []

    def dtype_layouts(dtypes):
        return [(dt, cl) for dt in dtypes for cl in ((False, True) if dt == f32 else (False,))]

    # pixel_shuffle_bn: x in float32/float16/bfloat16 (float64 goes to another backend), statistics
    # float32. Its tilings and blocks come from the host code's _tiling / _reduction_grid on meta
    # tensors. Small odd shapes (no alignment provable: the scalar fallback) at r=1, 2 with
    # 32- and 64-bit indices (WIDE), r=3 (the rows tiling with a padded R); aligned benchmark-like
    # shapes ("aligned": the 16-byte vector path) in every dtype and both layouts. ACTIVATION
    # takes all its values at one small shape per tiling, silu elsewhere.
    psbn = modules["pixel_shuffle_bn"]

    def psbn_launches(dt, cl, shape, r, wide, acts, aligned=False):
        n, c, h, w = shape
        x = torch.empty_strided((n, c * r * r, h, w), _strides((n, c * r * r, h, w), cl), device="meta")
        os_ = _strides((n, c, h * r, w * r), cl)
        meta, count, groups = psbn._tiling(x, r)
        rmeta, rcount, per, splits, _ = psbn._reduction_grid(x, r, c)
        tag = (f"{str(dt)[6:]} {'channels_last' if cl else 'nchw'} {n}x{c * r * r}x{h}x{w} r={r} "
               f"{'i64' if wide else 'i32'}{' aligned' if aligned else ''}")
        common = dict(WIDE=wide, num_warps=psbn._NUM_WARPS)
        xs = x.stride()
        out.append(Launch("pixel_shuffle_bn._stats_kernel", tag,
                          (dt, f32, rcount, per, splits, c, h, w, *xs), dict(**rmeta, **common)))
        for act in acts:
            out.append(Launch("pixel_shuffle_bn._eval_forward_kernel", f"{tag} {act}",
                              (dt, dt, f32, f32, count, c, h, w, *xs, *os_, 0.1),
                              dict(ACTIVATION=act, **meta, **common)))
            out.append(Launch("pixel_shuffle_bn._backward_sums_kernel", f"{tag} {act}",
                              (dt, dt, f32, f32, f32, f32, rcount, per, splits, c, h, w, *xs, *os_, 0.1),
                              dict(ACTIVATION=act, **rmeta, **common)))
            out.append(Launch("pixel_shuffle_bn._backward_input_kernel", f"{tag} {act}",
                              (dt, dt, dt, f32, count, c, h, w, *xs, *os_, *xs, 0.1),
                              dict(ACTIVATION=act, **meta, **common)))

    for (dt, cl), r, wide in itertools.product(dtype_layouts((f32, *half_dtypes)), (1, 2), (False, True)):
        every = dt == f32 and r == 2 and not wide
        psbn_launches(dt, cl, (2, 3, 5, 7), r, wide, activations if every else ("silu",))
    for cl in (False, True):
        psbn_launches(f32, cl, (2, 2, 5, 7), 3, False, ("silu",))
    for dt, cl, (shape, r) in itertools.product((f32, *half_dtypes), (False, True),
                                                (((16, 64, 64, 64), 2), ((8, 64, 32, 32), 4))):
        for wide in (False, True) if dt == f32 else (False,):
            psbn_launches(dt, cl, shape, r, wide, ("silu",), aligned=True)

    # shuffle_upsample: x in every float dtype, accumulation (weights, statistics) in stat_dtype.
    # Scale factors 1, 2, 3, 5, 8, 16: every SSP bucket (next power of 2 of s*s) up to 256, so
    # every block size; bilinear is scale 2 only. WIDE (64-bit index math, tensors with offsets
    # past 2**31) in float32 nchw at scale 2 only, training and one activation epilogue.
    su = modules["shuffle_upsample"]
    scales = [(s, "nearest") for s in (1, 2, 3, 5, 8, 16)] + [(2, "bilinear")]
    for dt, cl in dtype_layouts((f32, f64, *half_dtypes)):
        acc = f64 if dt == f64 else f32
        n, c, cg, h, w = 2, 6, 3, 5, 7
        xs = _strides((n, c, h, w), cl)
        base = f"{str(dt)[6:]} {'channels_last' if cl else 'nchw'}"
        for (s, mode), wide in itertools.product(scales, (False, True)):
            if wide and (s != 2 or dt != f32 or cl):
                continue
            oh, ow = h * s, w * s
            gs = _strides((n, c, oh, ow), cl)
            ssp, bil = su._ssp(s), mode == "bilinear"
            tag = f"{base} {mode} s={s} {'i64' if wide else 'i32'}"
            fblock = su._block(16 * ssp, 8192, acc)
            t = triton.cdiv(h * w, fblock)
            # training: statistics only (no bias, no activation); otherwise the folded bias + activation.
            epilogues = [dict(STATS=True, HAS_BIAS=False, ACTIVATION="none")] + \
                        [dict(STATS=False, HAS_BIAS=True, ACTIVATION=a)
                         for a in (activations if s == 2 and not wide else ["silu"])]
            for ep in epilogues:
                what = "stats" if ep["STATS"] else ep["ACTIVATION"]
                out.append(Launch("shuffle_upsample._forward_kernel", f"{tag} {what}",
                                  (dt, acc, acc, dt, acc, c, cg, h, w, oh, ow, t, *xs, 0.1),
                                  dict(S=s, SSP=ssp, BILINEAR=bil, BLOCK=fblock, WIDE=wide, **ep)))
                if bil:
                    nb = 2 * ow + 2 * (oh - 2)
                    out.append(Launch("shuffle_upsample._forward_border_kernel", f"{tag} {what}",
                                      (dt, acc, acc, dt, acc, c, cg, h, w, oh, ow, nb,
                                       triton.cdiv(nb, su._BORDER_BLOCK), *xs, 0.1),
                                      dict(BLOCK=su._BORDER_BLOCK, WIDE=wide, **ep)))
            window, p = su._window(s, mode, "cpu")
            k = window.shape[0]
            kk = triton.next_power_of_2(k * k)
            gblock = su._block(kk, 2048, acc)
            out.append(Launch("shuffle_upsample._grad_x_kernel", tag,
                              (dt, acc, dt, c, cg, h, w, oh, ow, triton.cdiv(h * w, gblock), *gs),
                              dict(S=s, P=p, K=k, KK=kk, BLOCK=gblock, WIDE=wide)))
            wblock = su._block(16 * ssp, 2048, acc)
            t = triton.cdiv(h * w, wblock)
            for one_tile in (True, False):
                out.append(Launch("shuffle_upsample._grad_weight_kernel", f"{tag} ONE_TILE={one_tile}",
                                  (dt, dt, acc, c, cg, h, w, oh, ow, t, 1 if one_tile else 3, t, *xs, *gs),
                                  dict(S=s, SSP=ssp, BILINEAR=bil, ONE_TILE=one_tile, BLOCK=wblock, WIDE=wide)))
            if bil:
                nb, bblock = 2 * w + 2 * h, su._gx_border_block(acc)
                out.append(Launch("shuffle_upsample._grad_x_border_kernel", tag,
                                  (dt, acc, dt, c, cg, h, w, oh, ow, nb, triton.cdiv(nb, bblock), *gs),
                                  dict(BLOCK=bblock, WIDE=wide)))
                nb = 2 * ow + 2 * (oh - 2)
                out.append(Launch("shuffle_upsample._grad_weight_border_kernel", tag,
                                  (dt, dt, acc, c, cg, h, w, oh, ow, nb, triton.cdiv(nb, su._BORDER_BLOCK), *xs, *gs),
                                  dict(BLOCK=su._BORDER_BLOCK, WIDE=wide)))

    # multi_dilation_conv2d: float32/float16/bfloat16 on the GPU, every autotune config. A small
    # odd shape (nothing aligned; every epilogue) and a benchmark-like aligned one (8x256x64x64
    # -> 4 branches x 64, k = 1, 3, 3, 3: the host gives half dtypes channels_last x there and
    # CH_ALIGN = 16); WIDE (64-bit index math) at the odd shape with the first config.
    mdc = modules["multi_dilation_conv2d"]
    i32, i64 = torch.int32, torch.int64
    shapes = [("odd", 2, 6, 20, 19, 23, 1), ("aligned", 8, 256, 256, 64, 64, mdc._ALIGN.value)]
    for (shape, n, c_in, c_tot, h, w, ch_align), (dt, cl) in itertools.product(
            shapes, dtype_layouts((f32, *half_dtypes))):
        aligned = shape == "aligned"
        if aligned and cl:
            continue
        x_cl = cl or (aligned and dt != f32)
        xs, ys = _strides((n, c_in, h, w), x_cl), _strides((n, c_tot, h, w), cl)
        gps = _strides((n, c_tot, h, w), True)  # grad_pre is made channels_last
        key = mdc._dtype_key(torch.empty(0, dtype=dt))
        tag = f"{str(dt)[6:]} {'aligned-' if aligned else ''}{'channels_last' if cl else 'nchw'}"
        w_total = 64 * c_in * (1 + 3 * 9) if aligned else 1000
        # Forward epilogues: bias or not x activation; GRAD=True (backward's grad_pre) for
        # activations only. All of them with the first config; every config with bias + silu.
        configs = mdc._prune_forward(mdc._forward_kernel.configs, {}, DTYPE_KEY=key)
        for has_bias, act, grad, wide in itertools.product((True, False), activations, (False, True),
                                                           (False, True)):
            if grad and act == "none":
                continue
            heaviest = has_bias and act == "silu"
            if not heaviest and (cl or aligned or dt == torch.float16) or wide and (aligned or not heaviest):
                continue
            for cfg in configs[:1] if wide or not heaviest else configs:
                out.append(Launch("multi_dilation_conv2d._forward_kernel",
                                  f"{tag} bias={has_bias} {act}{' GRAD' if grad else ''} {_cfg_label(cfg)}"
                                  f" {'i64' if wide else 'i32'}",
                                  (dt, dt, dt, dt, i64 if wide else i32, dt, n * h * w, c_in, c_tot, h, w, *xs,
                                   *(gps if grad else ys), *ys, 0.1),
                                  dict(HAS_BIAS=has_bias, ACTIVATION=act, DTYPE_KEY=key, UPCAST=False, GRAD=grad,
                                       WIDE=wide, BLOCK_N=mdc._BLOCK_N, **cfg.all_kwargs())))
        for wide in (False, True) if not aligned else (False,):
            common = dict(DTYPE_KEY=key, UPCAST=False, CH_ALIGN=ch_align, WIDE=wide)
            label = "i64" if wide else "i32"
            gx_configs = mdc._prune_grad_x(mdc._grad_x_kernel.configs, {}, DTYPE_KEY=key)
            for cfg in gx_configs[:1] if wide else gx_configs:
                out.append(Launch("multi_dilation_conv2d._grad_x_kernel", f"{tag} {_cfg_label(cfg)} {label}",
                                  (dt, dt, i64 if wide else i32, dt, 4, n * h * w, c_in, c_tot, h, w, *gps, *xs),
                                  dict(**common, **cfg.all_kwargs())))
            for cfg in mdc._grad_w_kernel.configs[:1] if wide else mdc._grad_w_kernel.configs:
                out.append(Launch("multi_dilation_conv2d._grad_w_kernel", f"{tag} {_cfg_label(cfg)} {label}",
                                  (dt, dt, torch.float32, i64 if wide else i32, n * h * w, c_in, c_tot, h, w, 192,
                                   w_total, *xs, *gps),
                                  dict(**common, BLOCK_CO=mdc._BLOCK_N, **cfg.all_kwargs())))
    return out


def _cfg_label(cfg):
    blocks = "x".join(str(v) for v in cfg.kwargs.values())
    return f"cfg {blocks} w{cfg.num_warps} s{cfg.num_stages}"


def _kernels(triton, modules):
    """Every launchable Triton kernel: module-level JIT functions (or autotuned ones) named *_kernel."""
    names = []
    for mod_name, mod in modules.items():
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and isinstance(_jit_function(triton, obj), triton.runtime.jit.JITFunction):
                names.append(f"{mod_name}.{name}")
    return names


def _jit_function(triton, obj):
    """The JITFunction of a kernel (an Autotuner wraps one)."""
    return obj.fn if isinstance(obj, triton.runtime.autotuner.Autotuner) else obj


_WORKER: dict = {}
_SPILLS_ONLY = False  # set by --spills-only before the workers fork: no SASS (cuobjdump -sass ~1 s each)


def _compile_one(index):
    """Compile LAUNCHES[index] (in a worker process); returns (index, error, regs, stack, local, shared, warps)."""
    if not _WORKER:
        torch, triton, modules = _triton_setup()
        _WORKER.update(torch=torch, triton=triton, modules=modules, launches=_launches(torch, triton, modules))
    torch, launch = _WORKER["torch"], _WORKER["launches"][index]
    from triton.runtime.jit import MockTensor
    mod_name, name = launch.kernel.split(".")
    # configs are passed explicitly, not autotuned
    kernel = _jit_function(_WORKER["triton"], getattr(_WORKER["modules"][mod_name], name))
    args = [MockTensor(a) if isinstance(a, torch.dtype) else a for a in launch.args]
    try:
        compiled = kernel.warmup(*args, grid=(1,), **launch.constexprs)
    except Exception as error:  # noqa: BLE001 - every compile error is reported
        return index, f"{type(error).__name__}: {error}", None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = _cubin_usage(f.name)
        profile = None if _SPILLS_ONLY else machine_code_profile(_sass(f.name), compiled.asm["ptx"])
    return index, None, (usage, compiled.metadata.shared, compiled.metadata.num_warps, profile)


def _cuobjdump():
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


def _cubin_usage(path):
    text = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    return dict(regs=int(m[1]), stack=int(m[2]), local=int(m[4]))


def _sass(path):
    return subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout


_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")
_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def machine_code_profile(sass, ptx):
    """What a kernel's design needs to see in its machine code: the widest global load and store
    (bits), tensor-core instructions (HGMMA = wgmma, HMMA = mma), asynchronous copies (LDGSTS =
    cp.async, UTMALDG = TMA) and 64-bit integer divisions/remainders (PTX div/rem .s64/.u64,
    which ptxas turns into a call of a ~40-instruction routine)."""
    opcodes = _OPCODE.findall(sass)

    def width(op):  # LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32
        return next((_WIDTH[part] for part in op.split(".")[1:] if part in _WIDTH), 32)

    def widest(prefix):
        return max([width(op) for op in opcodes if op.split(".")[0] == prefix] or [0])

    def count(*names):
        return sum(op.split(".")[0] in names for op in opcodes)

    return dict(ldg_bits=widest("LDG"), stg_bits=widest("STG"), hgmma=count("HGMMA"), hmma=count("HMMA"),
                async_copies=count("LDGSTS", "UTMALDG", "UBLKCP"),
                div64=len(re.findall(r"\b(?:div|rem)(?:\.\w+)*\.[su]64\b", ptx)), instructions=len(opcodes))


# The machine-code properties each kernel's design needs (docs/roofline.md says why): name,
# the kernels and dtypes it concerns, the test on a machine_code_profile and the configuration's
# label (None where the need does not apply), and whether the gate
# requires it now. A property the kernel already has is required, so losing it fails CI; one it
# lacks is reported as missing until the kernel is rewritten to have it.
HALF = ("float16", "bfloat16")


def _tile_rows(label):
    """The first block size of a configuration label ("... cfg 64x32 w8 s2" -> 64)."""
    m = re.search(r"cfg (\d+)x", label)
    return int(m[1]) if m else 0


DESIGN_NEEDS = [
    ("no 64-bit division with 32-bit indices (i32)", "pixel_shuffle_bn.", None,
     lambda p, label: None if " i64" in label else p["div64"] == 0, True),
    # (the vector path needs alignment Triton can prove: the "aligned" configurations)
    ("16-byte vector loads (aligned shapes)", "pixel_shuffle_bn.", None,
     lambda p, label: p["ldg_bits"] >= 128 if " aligned" in label else None, True),
    ("16-byte vector stores (aligned shapes)", "pixel_shuffle_bn._eval_forward_kernel", None,
     lambda p, label: p["stg_bits"] >= 128 if " aligned" in label else None, True),
    ("16-byte vector stores (aligned shapes)", "pixel_shuffle_bn._backward_input_kernel", None,
     lambda p, label: p["stg_bits"] >= 128 if " aligned" in label else None, True),
    ("no 64-bit division with 32-bit indices (i32)", "shuffle_upsample.", None,
     lambda p, label: None if " i64" in label else p["div64"] == 0, True),
    ("tensor-core instructions (HGMMA or HMMA)", "multi_dilation_conv2d.", HALF,
     lambda p, label: p["hgmma"] + p["hmma"] > 0, True),
    # (wgmma computes 64-row tiles: the 32-row configurations, for small maps, use mma)
    ("wgmma (HGMMA) in tiles of >= 64 rows", "multi_dilation_conv2d.", HALF,
     lambda p, label: p["hgmma"] > 0 if _tile_rows(label) >= 64 else None, True),
    ("asynchronous copies (cp.async or TMA)", "multi_dilation_conv2d._forward_kernel", ("float32",),
     lambda p, label: p["async_copies"] > 0, True),
    ("asynchronous copies (cp.async or TMA)", "multi_dilation_conv2d._grad_x_kernel", ("float32",),
     lambda p, label: p["async_copies"] > 0, True),
    # Half dtypes: the padded weights load by cp.async at any shape; the activations too where
    # the channel counts are multiples of 16 (channels_last, "aligned-" configurations).
    ("asynchronous copies (cp.async or TMA)", "multi_dilation_conv2d._forward_kernel", HALF,
     lambda p, label: p["async_copies"] > 0, True),
    ("asynchronous copies (cp.async or TMA)", "multi_dilation_conv2d._grad_x_kernel", HALF,
     lambda p, label: p["async_copies"] > 0, True),
    ("asynchronous copies of both operands (aligned channels)", "multi_dilation_conv2d.", HALF,
     lambda p, label: p["async_copies"] >= 4 if " aligned-" in label else None, True),
    ("no 64-bit division with 32-bit indices (i32)", "multi_dilation_conv2d.", None,
     lambda p, label: None if " i64" in label else p["div64"] == 0, True),
]


def design_check(compiled, needs, intro, backend):
    """(markdown lines, failures) for [(kernel, label, profile)], a label starting with the dtype:
    each need, met or not, per kernel and dtype; a required need not met everywhere is a failure."""
    lines = ["### Design properties in the machine code", "", intro, "",
             "| need | kernel | dtypes | required | met in |", "|---|---|---|---|---:|"]
    failures, missing = [], set()
    for need, prefix, dtypes, test, required in needs:
        rows: dict = {}
        for kernel, label, profile in compiled:
            dtype = label.split()[0]
            if not kernel.startswith(prefix) or (dtypes and dtype not in dtypes):
                continue
            ok = test(profile, label)
            if ok is None:  # the need does not apply to this configuration
                continue
            rows.setdefault(kernel, []).append((dtype, label, ok))
            if required and not ok:
                failures.append(f"{kernel} [{label}]: lost a required property: {need}")
        for kernel, results in rows.items():
            met = sum(ok for _, _, ok in results)
            shown = ", ".join(sorted({d for d, _, _ in results}))
            lines.append(f"| {need} | `{kernel}` | {shown} | {'yes' if required else 'no'} | "
                         f"{met} of {len(results)} configurations |")
            if met < len(results):
                missing.add(kernel.split(".")[0])
    return lines + [""], failures + default_order_check(backend, missing)


def default_order_check(backend, ops_missing_needs):
    """Failures for the ops whose default backend on CUDA is ``backend`` although some of its
    kernels miss a design need: such a backend must not be the default (docs/roofline.md)."""
    sys.path.insert(0, ROOT)
    from uresnet_ops.backends import DEFAULT_ORDER
    return [f"{op}: the {backend} backend misses design needs (above) but is first in "
            f"DEFAULT_ORDER['{op}']['cuda'] (uresnet_ops/backends.py)"
            for op in sorted(ops_missing_needs) if DEFAULT_ORDER[op]["cuda"][0] == backend]


def triton_report(jobs, only=None):
    """(markdown lines, failures); ``only``: compile just the kernels whose "module.kernel" name
    starts with it (while working on one module)."""
    torch, triton, modules = _triton_setup()
    every = _launches(torch, triton, modules)
    selected = [i for i, launch in enumerate(every) if only is None or launch.kernel.startswith(only)]
    launches = [every[i] for i in selected]
    failures = []
    covered = {launch.kernel for launch in launches}
    for name in _kernels(triton, modules):
        if name not in covered and (only is None or name.startswith(only)):
            failures.append(f"{name}: no launch configuration in scripts/gpu_resources.py (add it to _launches)")
    start = time.time()
    results = [None] * len(launches)
    ctx = multiprocessing.get_context("fork")  # the workers inherit nothing CUDA: there is none
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        for position, (_, error, usage) in enumerate(pool.map(_compile_one, selected, chunksize=4)):
            results[position] = (error, usage)
    print(f"gpu_resources: {len(launches)} Triton compiles in {time.time() - start:.0f} s ({jobs} processes)",
          file=sys.stderr)
    lines = ["## Triton kernels (sm_90, Triton's bundled ptxas)", "",
             f"{len(launches)} launch configurations of {len(covered)} kernels compiled with triton "
             f"{triton.__version__}. Registers per thread, stack "
             "(spill) and local bytes from `cuobjdump -res-usage`, shared memory from the compiled "
             "kernel's metadata. Rows are grouped per kernel; identical resource figures are merged.", ""]
    by_kernel: dict = {}
    profiles = []
    for launch, (error, usage) in zip(launches, results):
        if error is not None:
            lines_ = [line.strip() for line in error.splitlines() if line.strip()]
            failures.append(f"{launch.kernel} [{launch.label}]: {lines_[0][:200]} {lines_[-1][:300]}")
            detail = error if len(error) < 4000 else error[:4000] + " ..."
            print(f"--- {launch.kernel} [{launch.label}] {launch.constexprs}\n{detail}\n", file=sys.stderr)
            continue
        res, shared, warps, profile = usage
        profiles.append((launch.kernel, launch.label, profile))
        if res["stack"] or res["local"]:
            failures.append(f"{launch.kernel} [{launch.label}]: {res['stack']} stack / {res['local']} local bytes "
                            "(register spills)")
        by_kernel.setdefault(launch.kernel, []).append((launch.label, res, shared, warps))
    lines += ["| kernel | configurations | warps | registers | stack/spill bytes | shared bytes |",
              "|---|---|---:|---:|---:|---:|"]
    for kernel, rows in by_kernel.items():
        groups: dict = {}
        for label, res, shared, warps in rows:
            groups.setdefault((warps, res["regs"], res["stack"] + res["local"], shared), []).append(label)
        for (warps, regs, stack, shared), labels in sorted(groups.items(), key=lambda kv: -kv[0][1]):
            shown = "; ".join(labels[:3]) + (f"; ... ({len(labels)} in all)" if len(labels) > 3 else "")
            lines.append(f"| `{kernel}` | {shown} | {warps} | {regs} | {stack} | {shared} |")
    lines.append("")
    if _SPILLS_ONLY:
        return lines, failures
    lines += machine_code_table(profiles)
    design_lines, design_failures = design_check(profiles, DESIGN_NEEDS, (
        "Checked on every compiled configuration (DESIGN_NEEDS in scripts/gpu_resources.py). "
        "`required` ones fail the gate when lost; the others are what a rewrite still owes. "
        "Vector and both-operand cp.async needs apply to the `aligned` configurations, "
        "benchmark-like shapes where Triton can prove 16-byte alignment; the small odd shapes "
        "compile the unaligned fallback."), "triton")
    return lines + design_lines, failures + design_failures


def machine_code_table(profiles):
    """One row per kernel and dtype/layout: the machine_code_profile ranges over its configurations."""
    lines = ["### Machine code (SASS) per kernel", "",
             "Widest global load/store in bits; counts of wgmma (HGMMA), mma (HMMA) and asynchronous "
             "copies (LDGSTS/TMA) in the SASS; 64-bit div/rem in the PTX; instructions in all. Ranges "
             "are over the configurations.", "",
             "| kernel | dtype, variant | LDG bits | STG bits | HGMMA | HMMA | async copies | 64-bit div/rem "
             "| instructions |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict = {}
    for kernel, label, profile in profiles:
        groups.setdefault((kernel, " ".join(label.split()[:2])), []).append(profile)

    def span(values):
        lo, hi = min(values), max(values)
        return str(lo) if lo == hi else f"{lo}–{hi}"

    for (kernel, what), group in groups.items():
        cells = [span([p[k] for p in group]) for k in
                 ("ldg_bits", "stg_bits", "hgmma", "hmma", "async_copies", "div64", "instructions")]
        lines.append(f"| `{kernel}` | {what} | " + " | ".join(cells) + " |")
    return lines + [""]


# ---- CUDA -----------------------------------------------------------------------------------

def _nvcc_command(source, cubin):
    import torch
    from torch.utils import cpp_extension
    site = os.path.dirname(os.path.dirname(torch.__file__))
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    includes = [*cpp_extension.include_paths(), *(os.path.join(site, "nvidia", v, "include") for v in ("cu13", "cu12"))]
    # The flags setup.py's build uses (torch's COMMON_NVCC_FLAGS, -O3, the extension's defines),
    # device code only: -cubin skips the host compilation, most of a full build's time.
    return [nvcc, "-cubin", f"-gencode=arch=compute_{TARGET_ARCH},code=sm_{TARGET_ARCH}", "-Xptxas", "-v", "-O3",
            "-std=c++20", "-DURESNET_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
            *cpp_extension.COMMON_NVCC_FLAGS, *(f"-I{d}" for d in includes if os.path.isdir(d)),
            "-o", cubin, source]


def _nvcc_version():
    out = subprocess.run([_nvcc_command("", "")[0], "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m[1] if m else "?"


def _compile_cu(source):
    """(source, exit code, ptxas log, {mangled kernel: machine_code_profile}, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "out.cubin")
        cmd = _nvcc_command(source, cubin)
        cmd[1:1] = ["--keep", "--keep-dir", tmp]  # keeps the PTX, for the 64-bit divisions
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        profiles = {}
        if proc.returncode == 0:
            ptx_files = glob.glob(os.path.join(tmp, "*.ptx"))
            ptx = _functions(open(ptx_files[0]).read() if ptx_files else "", r"^(?:\.visible |\.weak )*\.entry (\w+)\(")
            sass = _functions(_sass(cubin), r"^\s*Function : (\S+)")
            profiles = {name: machine_code_profile(code, ptx.get(name, "")) for name, code in sass.items()}
        return source, proc.returncode, proc.stdout + proc.stderr, profiles, time.time() - start


def _functions(text, header):
    """{function name: its text} for a SASS or PTX listing with one ``header`` line per function."""
    functions, name = {}, None
    for line in text.splitlines():
        m = re.match(header, line)
        if m:
            name = m[1]
            functions[name] = []
        elif name is not None:
            functions[name].append(line)
    return {name: "\n".join(lines) for name, lines in functions.items()}


def _demangle(names):
    filt = shutil.which("cu++filt") or shutil.which("c++filt")
    if not filt or not names:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def _short(name):
    name = re.sub(r"\(anonymous namespace\)::|uresnet::|c10::|at::native::|\bunsigned int\b", lambda m: {
        "unsigned int": "u32"}.get(m[0], ""), name)
    name = name.replace("unsigned long", "u64").replace("long", "i64")
    if name.endswith(")"):  # drop the parameter list: from its matching "(" on
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                return name[:i]
    return name


def parse_ptxas(log):
    """{mangled kernel: dict(regs, spill_stores, spill_loads, stack, smem)} from -Xptxas -v output."""
    kernels, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = kernels.setdefault(m[1], {})
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            smem = re.search(r"(\d+) bytes smem", line)
            current.update(regs=int(m[1]), smem=int(smem[1]) if smem else 0)
            current = None
    return kernels


# CUDA kernels that spilled when this gate was introduced: (file, kernel) -> (spill stores, loads)
# in bytes. The gate fails on a spill in any other kernel and on more spilling in these.
KNOWN_CUDA_SPILLS = {
    ("shuffle_upsample.cu", "void grad_input_kernel<BFloat16>"): (16, 52),
    ("shuffle_upsample.cu", "void grad_input_kernel<Half>"): (16, 52),
    ("shuffle_upsample.cu", "void grad_input_kernel<float>"): (16, 52),
    ("shuffle_upsample.cu", "void stats_kernel<BFloat16>"): (24, 24),
    ("shuffle_upsample.cu", "void stats_kernel<Half>"): (24, 24),
    ("shuffle_upsample.cu", "void stats_kernel<double>"): (24, 24),
    ("shuffle_upsample.cu", "void stats_kernel<float>"): (24, 24),
}


# What each CUDA kernel's design needs (docs/roofline.md), as DESIGN_NEEDS for Triton: kernels are
# "file.cu kernel_name", labels "dtype template-arguments...". Only the needs they meet are
# required; a backend whose kernels miss one is not the default on CUDA (backends.DEFAULT_ORDER).
CUDA_DESIGN_NEEDS = [
    ("16-byte vector loads", "pixel_shuffle_bn.cu", None, lambda p, label: p["ldg_bits"] >= 128, False),
    ("no 64-bit division with 32-bit indices (u32)", "pixel_shuffle_bn.cu", None,
     lambda p, label: None if " u64" in label else p["div64"] == 0, True),
    ("16-byte vector loads", "shuffle_upsample.cu", HALF + ("float32",),
     lambda p, label: p["ldg_bits"] >= 128, False),
    ("tensor-core instructions (HGMMA or HMMA)", "shuffle_upsample.cu forward", HALF,
     lambda p, label: p["hgmma"] + p["hmma"] > 0, False),
    ("no 64-bit division in the kernel", "shuffle_upsample.cu", None, lambda p, label: p["div64"] == 0, False),
    ("tensor-core instructions (HGMMA or HMMA)", "multi_dilation_conv2d.cu", HALF,
     lambda p, label: p["hgmma"] + p["hmma"] > 0 if "WmmaEngine" in label else None, True),
    ("wgmma (HGMMA), not only mma", "multi_dilation_conv2d.cu", HALF,
     lambda p, label: p["hgmma"] > 0 if "WmmaEngine" in label else None, False),
    ("asynchronous copies (cp.async or TMA)", "multi_dilation_conv2d.cu", None,
     lambda p, label: p["async_copies"] > 0, False),
    ("16-byte vector loads", "multi_dilation_conv2d.cu", HALF, lambda p, label: p["ldg_bits"] >= 128, False),
    ("no 64-bit division in the kernel", "multi_dilation_conv2d.cu", None,
     lambda p, label: p["div64"] == 0, False),
]
_CUDA_DTYPES = {"BFloat16": "bfloat16", "Half": "float16", "float": "float32", "double": "float64"}


def _cuda_kernel_label(short):
    """("file.cu kernel", "dtype other-template-arguments") of a short kernel name such as
    ``void conv_gemm_kernel<Half, WmmaEngine<Half>, (Epilogue)0>``."""
    m = re.match(r"void (\w+)<(.*)>\s*$", short)
    if not m:
        return short, ""
    args, depth, part = [], 0, ""
    for ch in m[2] + ",":
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            args.append(part.strip())
            part = ""
        else:
            part += ch
    return m[1], " ".join([_CUDA_DTYPES.get(args[0], args[0]), *args[1:]])


def cuda_report(jobs, only=None):
    sources = [source for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
               if only is None or os.path.basename(source).startswith(only.split(".")[0])]
    failures = []
    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(_compile_cu, sources))
    print(f"gpu_resources: {len(sources)} nvcc compiles in {time.time() - start:.0f} s ({jobs} at a time)",
          file=sys.stderr)
    lines = ["## CUDA kernels (sm_90, nvcc -Xptxas -v)", "",
             f"{len(sources)} files compiled device-only for sm_90 (nvcc {_nvcc_version()}). "
             "One row per kernel instantiation (template arguments: scalar type, "
             "index type, ...). Spills listed in KNOWN_CUDA_SPILLS (scripts/gpu_resources.py) were there "
             "when the gate came; any other spill fails it.", "",
             "| file | kernel | registers | spill stores / loads (bytes) | stack bytes | shared bytes |",
             "|---|---|---:|---:|---:|---:|"]
    profiles = []
    for source, code, log, machine_code, _ in results:
        rel = os.path.relpath(source, ROOT)
        if code != 0:
            failures.append(f"{rel}: nvcc failed (exit {code})")
            print(f"--- {rel}\n{log[-6000:]}", file=sys.stderr)
            continue
        kernels = parse_ptxas(log)
        if not kernels:
            failures.append(f"{rel}: no kernel in the ptxas output")
        names = list(kernels)
        for mangled, short in sorted(zip(names, (_short(n) for n in _demangle(names))), key=lambda p: p[1]):
            k = kernels[mangled]
            spills = (k.get("spill_stores", 0), k.get("spill_loads", 0))
            known = KNOWN_CUDA_SPILLS.get((os.path.basename(rel), short), (0, 0))
            if spills[0] > known[0] or spills[1] > known[1]:
                failures.append(f"{rel} {short}: spills {spills[0]} / {spills[1]} bytes (known: {known})")
            lines.append(f"| `{os.path.basename(rel)}` | `{short}` | {k.get('regs')} | "
                         f"{k.get('spill_stores')} / {k.get('spill_loads')} | {k.get('stack')} | {k.get('smem')} |")
            if mangled in machine_code:
                kernel, label = _cuda_kernel_label(short)
                profiles.append((f"{os.path.basename(rel)} {kernel}", label, machine_code[mangled]))
            else:
                failures.append(f"{rel} {short}: not found in the cubin's SASS")
    lines.append("")
    lines += machine_code_table(profiles)
    design_lines, design_failures = design_check(profiles, CUDA_DESIGN_NEEDS, (
        "Checked on every kernel instantiation (CUDA_DESIGN_NEEDS in scripts/gpu_resources.py), "
        "from `cuobjdump -sass` of the cubin and the PTX nvcc kept. `required` ones fail the gate "
        "when lost; a CUDA kernel that misses a need is not its op's default on CUDA (see "
        "docs/roofline.md, \"Predicted share of the limit, and the backend order on CUDA\")."), "cuda")
    return lines + design_lines, failures + design_failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("triton", "cuda", "all"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--write", help="write the markdown report to this file (default: stdout)")
    parser.add_argument("--only", help="only the kernels whose module.kernel name starts with this "
                                       "(CUDA: the .cu files of that op)")
    parser.add_argument("--spills-only", action="store_true",
                        help="Triton: registers and spills only, no machine-code checks (the second toolchain's run)")
    args = parser.parse_args(argv)
    global _SPILLS_ONLY
    _SPILLS_ONLY = args.spills_only
    lines = ["# GPU kernel resources on sm_90 (H100/H200), compiled without a GPU", "",
             "Generated by `python scripts/gpu_resources.py all --write docs/gpu_resources.md`; do not edit.",
             "The same script is the CI compile gate (tests/test_gpu_compile.py): it fails on any compile",
             "error, on any register spill in a Triton kernel, on any new spill in a CUDA kernel, on a kernel",
             "that loses a machine-code property its design needs (DESIGN_NEEDS, CUDA_DESIGN_NEEDS) and on a",
             "default CUDA backend whose kernels miss one.", ""]
    failures = []
    for part, report in (("triton", triton_report), ("cuda", cuda_report)):
        if args.what in (part, "all"):
            part_lines, part_failures = report(args.jobs, args.only)
            lines += part_lines
            failures += part_failures
    text = "\n".join(lines) + "\n"
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    else:
        print(text)
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    print(f"gpu_resources: {len(failures)} failure(s)", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
