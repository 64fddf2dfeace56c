"""``uresnet_ops.fuse(model)``: rewrite any ``nn.Module`` to use the fused modules (docs/design.md §3.6).

Patterns (each checked for a configuration the fused op computes exactly; others are left as
they are and reported):

* ``PixelShuffle -> BatchNorm2d (-> ReLU | LeakyReLU | SiLU)``               -> ``PixelShuffleBN``
* ``Upsample -> Conv2d 3x3 (depthwise or grouped) -> BatchNorm2d (-> act) (-> ChannelShuffle)
  -> Conv2d 1x1``                                                            -> ``EUCB``
  (several ``3x3 -> BN -> act -> ChannelShuffle(groups)`` stages before the 1x1: ``EUCBStar``)
* ``torch.cat`` of convolution branches (conv (-> BN) (-> act)) on one input -> ``MultiDilationConv2d``
* ``torchvision.models.segmentation.deeplabv3.ASPP``                          -> ``ASPP``

They are found in ``nn.Sequential`` children (consecutive runs; nested plain Sequentials are
looked into), in known module classes (torchvision's ASPP), and in the ``forward`` of other
modules that ``torch.fx.symbolic_trace`` can trace (one level: submodules are leaves). A module
whose forward was rewritten becomes a ``torch.fx.GraphModule`` (of the same class name).

The fused modules share the original modules (Conv2d, BatchNorm2d, ...), so parameters,
buffers, ``requires_grad``, devices, dtypes and train/eval modes carry over untouched.

``fuse(model, inference=True)`` also folds eval-mode BatchNorms into the convolutions before
them (the last section); ``unfuse(model)`` turns the fused modules back into plain PyTorch.
"""
from __future__ import annotations

import copy
import dataclasses
from operator import getitem as _getitem

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights

from . import nn as unn

__all__ = ["fuse", "unfuse", "FuseReport", "FuseEntry"]

_FUSED_TYPES = (unn.PixelShuffleBN, unn.EUCB, unn.EUCBStar, unn.MultiDilationConv2d, unn.ASPP, unn.AtrousBlock)
_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.SiLU)
_ACTIVATION_NOTE = "the fused ops take ReLU, LeakyReLU, SiLU"


def _other_activation(module) -> str:
    """The class name of a torch activation module the fused ops do not take ("" otherwise)."""
    if _is_plain(module, _ACTIVATIONS) or type(module).__module__ != "torch.nn.modules.activation":
        return ""
    return type(module).__name__


@dataclasses.dataclass
class FuseEntry:
    path: str     # where in the model ("" is the model itself)
    pattern: str  # what was found, e.g. "PixelShuffle -> BatchNorm2d -> ReLU"
    detail: str   # the replacement, or why it was passed over
    modules: tuple = dataclasses.field(default=(), repr=False, compare=False)  # the modules looked at


@dataclasses.dataclass
class FuseReport:
    fused: list[FuseEntry] = dataclasses.field(default_factory=list)
    skipped: list[FuseEntry] = dataclasses.field(default_factory=list)
    folded: list[FuseEntry] = dataclasses.field(default_factory=list)  # inference=True: BatchNorms folded
    batch_norms_left: int | None = None  # inference=True: BatchNorm modules the model still runs

    def _fused(self, entry: FuseEntry, consumed):
        """Record a fusion; drops what was passed over in a nested module and is now fused
        from its parent (a Sequential ending early whose parent's forward completes it)."""
        self.fused.append(entry)
        self.skipped = [e for e in self.skipped if not any(m in consumed for m in e.modules)]

    def __str__(self):
        lines = [f"fused {len(self.fused)} pattern(s):"] + [f"  {e.path or '<model>'}: {e.pattern} -> {e.detail}"
                                                             for e in self.fused]
        if self.skipped:
            lines += [f"passed over {len(self.skipped)}:"] + [f"  {e.path or '<model>'}: {e.pattern}: {e.detail}"
                                                              for e in self.skipped]
        if self.batch_norms_left is not None:
            lines += [f"folded {len(self.folded)} BatchNorm(s) into the convolution before it "
                      f"({self.batch_norms_left} BatchNorm module(s) left):"]
            lines += [f"  {e.path or '<model>'}: {e.pattern} -> {e.detail}" for e in self.folded]
        return "\n".join(lines)


def fuse(model: nn.Module, inplace: bool = False, report: bool = False, inference: bool = False):
    """Replace the fusable patterns in ``model`` by the fused modules (see the module docstring).

    ``inplace=False`` works on a deep copy. Returns the model, or ``(model, FuseReport)`` with
    ``report=True``: what was replaced, and what looked fusable but was passed over, and why.

    ``inference=True`` (``model`` in eval mode) also folds every eval-mode BatchNorm that
    directly follows a convolution into it (see :func:`_fold_batch_norms`): the result is for
    inference only (its BatchNorms no longer exist to be trained), and its state dict lacks
    their entries."""
    if inference:
        training = next((name or "the model" for name, m in model.named_modules() if m.training), None)
        if training is not None:
            raise ValueError(f"fuse(inference=True): the model must be in eval mode (call model.eval() first): "
                             f"folding a BatchNorm uses its running statistics, and {training} is in training mode")
    if not inplace:
        model = copy.deepcopy(model)
    rep = FuseReport()
    holder = nn.Module()  # so the model itself can be replaced too (a Sequential, an ASPP, ...)
    holder._modules["model"] = model
    _fuse_children(holder, None, rep)
    if inference:
        _fold_batch_norms(holder, rep)
    model = holder._modules["model"]
    return (model, rep) if report else model


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inverse of :func:`fuse`: every fused module of :mod:`uresnet_ops.nn` in ``model``
    (the model itself included) replaced by its plain-PyTorch form (``module.plain()``, see
    :mod:`uresnet_ops.plain`), which computes the same chain with plain torch modules and
    functions, in training and eval, and has the same state-dict keys.

    The plain modules take over the fused modules' submodules, parameters and buffers (the
    same objects, modes included); ``inplace=False`` works on a deep copy, so ``model`` is left
    as it was and shares nothing with the result. A fused module found twice becomes one plain
    module. Forward hooks and ``sync`` (distributed statistics) of a fused module are not
    carried over."""
    if not inplace:
        model = copy.deepcopy(model)
    plain = {}  # fused module -> its plain form

    def plain_of(module):
        if module not in plain:
            plain[module] = module.plain()
            if hasattr(module, "_uresnet_renames"):  # fuse() replaced a whole module by this one
                _keep_original_keys(plain[module], *module._uresnet_renames)
        return plain[module]

    if isinstance(model, _FUSED_TYPES):
        return plain_of(model)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, _FUSED_TYPES):
                parent._modules[name] = plain_of(child)
    return model


# ----------------------------------------------------------------------------- the tree walk
def _join(path, name):
    return name if path is None else (f"{path}.{name}" if path else name)


def _fuse_children(module, path, rep):
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = _fuse_tree(child, "" if path is None else _join(path, name), rep)


def _fuse_tree(module, path, rep) -> nn.Module:
    """Fuses inside ``module`` (children first), then ``module`` itself; returns its replacement,
    whose state dict has the keys of ``module``'s (see :func:`_keep_original_keys`)."""
    before = list(module.state_dict(keep_vars=True).items())
    new = _fuse_subtree(module, path, rep)
    renames = _renames(before, list(new.state_dict(keep_vars=True).items()))
    if renames:
        _keep_original_keys(new, renames, [key for key, _ in before])
    return new


def _fuse_subtree(module, path, rep) -> nn.Module:
    if isinstance(module, _FUSED_TYPES):
        return module
    _fuse_children(module, path, rep)
    if _is_plain(module, nn.Sequential):
        _fuse_sequential(module, path, rep)
        return module
    if type(module).__module__.startswith("torch.") or not module._modules:
        return module  # torch's own layers and containers, leaves: nothing to trace
    return _fuse_traced(module, path, rep)


def _renames(before, after) -> dict:
    """{key in ``after``: key in ``before``} for the state-dict entries (key, tensor) whose key
    changed, matched by tensor identity (tied tensors in order)."""
    keys = {}
    for key, t in before:
        keys.setdefault(id(t), []).append(key)
    renames = {}
    for key, t in after:
        original = keys.get(id(t))
        if not original:
            raise RuntimeError(f"uresnet_ops.fuse: the fused state-dict entry {key!r} has no original "
                               "(please report this as a bug)")
        theirs = original.pop(0)
        if theirs != key:
            renames[key] = theirs
    return renames


class _RenameKeys:
    """A state-dict hook renaming keys under the module's prefix (``mapping``: {old: new},
    relative keys); with ``order`` (the new relative keys in order), those keys come in it."""

    def __init__(self, mapping: dict, order: list | None = None):
        self.mapping = mapping
        self.rank = None if order is None else {key: i for i, key in enumerate(order)}

    def __call__(self, module, state_dict, prefix, *args):
        items = list(state_dict.items())
        state_dict.clear()
        ours = []
        for key, value in items:
            local = key[len(prefix):] if key.startswith(prefix) else None
            if local is None:
                if ours:  # this module's entries are contiguous: put them back in place
                    state_dict.update(self._ordered(ours, prefix))
                    ours = []
                state_dict[key] = value
            else:
                ours.append((self.mapping.get(local, local), value))
        state_dict.update(self._ordered(ours, prefix))

    def _ordered(self, items, prefix):
        if self.rank is not None:
            items = sorted(items, key=lambda kv: self.rank.get(kv[0], len(self.rank)))
        return [(prefix + key, value) for key, value in items]


def _keep_original_keys(module, renames: dict, order: list) -> None:
    """Hooks keeping a rewritten module's state-dict keys those of the module it replaced
    (``renames``: {our key: their key}; ``order``: their keys in order): ``state_dict()`` gives
    theirs, in their order, and ``load_state_dict``
    takes theirs, so checkpoints of the original load into the fused model and back, strictly."""
    module.register_state_dict_post_hook(_RenameKeys(renames, order))
    module.register_load_state_dict_pre_hook(_RenameKeys({theirs: ours for ours, theirs in renames.items()}))
    module._uresnet_renames = renames, order  # for unfuse (the plain module keeps the keys) and pickling
    if isinstance(module, fx.GraphModule):
        _pickle_with_renames(module)


def _pickle_with_renames(module) -> None:
    """A GraphModule pickles as its code and attributes, without hooks; each has a class of its
    own, so its pickling can bring them back. Its deep copy gets a class of its own too
    (``GraphModule.__deepcopy__``), which must pickle the same way."""
    type(module).__reduce__ = _reduce_with_renames
    type(module).__deepcopy__ = _deepcopy_with_renames


def _reduce_with_renames(module):
    return _restore_renames, (fx.GraphModule.__reduce__(module), module._uresnet_renames)


def _deepcopy_with_renames(module, memo):
    new = fx.GraphModule.__deepcopy__(module, memo)  # copies the state-dict hooks, not other attributes
    new._uresnet_renames = copy.deepcopy(module._uresnet_renames, memo)
    _pickle_with_renames(new)
    return new


def _restore_renames(reduced, renames_and_order):
    rebuild, args = reduced
    module = rebuild(*args)
    _keep_original_keys(module, *renames_and_order)
    return module


def _is_plain(module, cls) -> bool:
    """An instance of ``cls`` that computes what ``cls`` does (no overridden forward)."""
    if isinstance(cls, tuple):
        return any(_is_plain(module, c) for c in cls)
    return isinstance(module, cls) and type(module).forward is cls.forward


def _flat(module) -> list:
    """The modules a call of ``module`` runs in order (plain Sequentials opened up)."""
    if _is_plain(module, nn.Sequential):
        return [m for child in module for m in _flat(child)]
    return [module]


# ----------------------------------------------------------------------------- chain matching
@dataclasses.dataclass
class _Match:
    pattern: str
    length: int = 0        # modules consumed (0: passed over)
    build: object = None   # () -> fused module
    reason: str = ""
    mods: tuple = ()       # the modules the pattern covers
    note: str = ""         # said with the fusion (an activation left out of it)


def _names(mods):
    return " -> ".join(type(m).__name__ for m in mods)


def _conv_problem(conv, kernel, groups_ok=False) -> str:
    """Why ``conv`` is not a stride-1, 'same'-padded conv of odd square ``kernel`` ("" if it is)."""
    k, d, p = conv.kernel_size, conv.dilation, conv.padding
    if not _is_plain(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not a plain Conv2d"
    if k[0] != k[1] or (kernel is not None and k[0] != kernel) or k[0] % 2 == 0:
        return f"kernel {k[0]}x{k[1]} (need {f'{kernel}x{kernel}' if kernel else 'odd square'})"
    if conv.stride != (1, 1):
        return f"stride {conv.stride}"
    if d[0] != d[1] or (kernel == 3 and d[0] != 1):
        return f"dilation {d}"
    if p != "same" and tuple(p) != (d[0] * (k[0] - 1) // 2,) * 2:
        return f"padding {p} (need {d[0] * (k[0] - 1) // 2})"
    if conv.padding_mode != "zeros" and k[0] > 1:
        return f"padding_mode {conv.padding_mode!r}"
    if conv.groups != 1 and not groups_ok:
        return f"groups={conv.groups}"
    return ""


def _bn_problem(bn, channels) -> str:
    if not _is_plain(bn, nn.BatchNorm2d):
        return f"{type(bn).__name__} is not a plain BatchNorm2d"
    return "" if bn.num_features == channels else f"BatchNorm2d({bn.num_features}) after {channels} channels"


def _act_config(act):
    return None if act is None else (type(act), getattr(act, "negative_slope", None))


def _match_pixel_shuffle(mods):
    if not (len(mods) >= 2 and _is_plain(mods[0], nn.PixelShuffle) and isinstance(mods[1], _BatchNorm)):
        return None
    ps, bn = mods[:2]
    act = mods[2] if len(mods) > 2 and _is_plain(mods[2], _ACTIVATIONS) else None
    other = _other_activation(mods[2]) if len(mods) > 2 else ""
    used = [ps, bn] + ([act] if act else [])
    problem = "" if _is_plain(bn, nn.BatchNorm2d) else f"{type(bn).__name__} is not a plain BatchNorm2d"
    if problem:
        return _Match(_names(used), reason=problem, mods=tuple(used))
    return _Match(_names(used), len(used), lambda: unn.PixelShuffleBN.from_modules(ps, bn, act), mods=tuple(used),
                  note=f"{other} after it left out ({_ACTIVATION_NOTE})" if other else "")


def _upsample_problem(up) -> str:
    if up.size is not None:
        return "Upsample with size= (need an integer scale_factor)"
    s = up.scale_factor if isinstance(up.scale_factor, (tuple, list)) else (up.scale_factor,) * 2
    if s[0] != s[1] or float(s[0]) != int(s[0]) or int(s[0]) < 1:
        return f"scale_factor {up.scale_factor} (need one integer)"
    if up.mode not in ("nearest", "bilinear"):
        return f"mode {up.mode!r} (need 'nearest' or 'bilinear')"
    if up.mode == "bilinear" and int(s[0]) != 2:
        return f"bilinear scale_factor {s[0]} (bilinear supports x2)"
    if up.align_corners:
        return "align_corners=True"
    if getattr(up, "recompute_scale_factor", None):
        return "recompute_scale_factor=True"
    return ""


def _match_upsample(mods):
    """Upsample -> [Conv3x3 -> BN (-> act) (-> ChannelShuffle)] x n -> Conv1x1."""
    if not (len(mods) >= 2 and _is_plain(mods[0], nn.Upsample) and isinstance(mods[1], nn.Conv2d)):
        return None
    up, i, stages = mods[0], 1, []  # stages: (conv, bn, act, shuffle groups or None)
    problem = _upsample_problem(up)
    while not problem:
        conv = mods[i]
        c = conv.in_channels
        problem = _conv_problem(conv, 3, groups_ok=True) or (
            f"3x3 conv {c} -> {conv.out_channels} channels (need {c} -> {c})" if conv.out_channels != c else
            "3x3 conv with bias" if conv.bias is not None else "")
        if problem:
            break
        if i + 1 >= len(mods):
            problem = "no BatchNorm2d after the 3x3 conv"
            break
        problem = _bn_problem(mods[i + 1], c)
        if problem:
            break
        bn, i = mods[i + 1], i + 2
        if i < len(mods) and _other_activation(mods[i]):
            problem = f"activation {_other_activation(mods[i])} ({_ACTIVATION_NOTE})"
            break
        act = mods[i] if i < len(mods) and _is_plain(mods[i], _ACTIVATIONS) else None
        i += act is not None
        shuffle = mods[i].groups if i < len(mods) and _is_plain(mods[i], nn.ChannelShuffle) else None
        i += shuffle is not None
        stages.append((conv, bn, act, shuffle))
        nxt = mods[i] if i < len(mods) else None
        if isinstance(nxt, nn.Conv2d) and nxt.kernel_size == (1, 1):
            problem = _conv_problem(nxt, 1) or (f"1x1 conv of {nxt.in_channels} channels after {c}"
                                                 if nxt.in_channels != c else "")
            break
        if not (isinstance(nxt, nn.Conv2d) and shuffle is not None):  # EUCB* stages end in a shuffle
            problem = f"no 1x1 Conv2d after {_names(mods[i - 2 - (act is not None) - (shuffle is not None):i])}"
    used = mods[:i + 1] if not problem else mods[:max(i, 2)]
    pattern = _names(used)
    if problem:
        return _Match(pattern, reason=problem, mods=tuple(used))
    pw = mods[i]
    if len(stages) == 1:
        conv, bn, act, shuffle = stages[0]
        return _Match(pattern, len(used), lambda: unn.EUCB.from_modules(up, conv, bn, act, pw, shuffle or 1),
                      mods=tuple(used))
    g = stages[0][0].groups
    if any(conv.groups != g or shuffle != g or _act_config(act) != _act_config(stages[0][2])
           for conv, _, act, shuffle in stages):
        return _Match(pattern, reason="EUCB* stages need the same conv groups g, ChannelShuffle(g) and "
                                      "activation in every stage", mods=tuple(used))
    return _Match(pattern, len(used), lambda: unn.EUCBStar.from_modules(up, [s[:3] for s in stages], pw),
                  mods=tuple(used))


def _with_note(detail, note):
    return f"{detail}; {note}" if note else detail


_CHAIN_MATCHERS = (_match_pixel_shuffle, _match_upsample)


def _match_units(units, start):
    """The match starting at ``units[start]`` (units: lists of modules run one after the other),
    as (match, number of units consumed), or None."""
    flat = [m for unit in units[start:] for m in unit]
    for matcher in _CHAIN_MATCHERS:
        match = matcher(flat)
        if match is None:
            continue
        if match.length:
            ends = [sum(len(u) for u in units[start:start + n]) for n in range(1, len(units) - start + 1)]
            if match.length not in ends:
                return dataclasses.replace(match, length=0, reason="the pattern ends inside a nested module"), 0
            used = flat[:match.length]
            hooked = [type(m).__name__ for m in used if m._forward_hooks or m._forward_pre_hooks]
            if hooked:
                return dataclasses.replace(match, length=0, reason=f"forward hooks on {', '.join(hooked)}"), 0
            return match, ends.index(match.length) + 1
        return match, 0
    return None


def _fuse_sequential(seq, path, rep):
    keys = list(seq._modules)
    units = [_flat(seq._modules[k]) for k in keys]
    i = 0
    while i < len(keys):
        found = _match_units(units, i)
        if found is None:
            i += 1
            continue
        match, n = found
        where = f"{path}[{i}:{i + max(n, 1)}]" if path else f"[{i}:{i + max(n, 1)}]"
        if not n:
            rep.skipped.append(FuseEntry(where, match.pattern, match.reason, match.mods))
            i += 1
            continue
        fused = match.build()
        # The fused module takes the first place; Identity keeps the others' indices (and the
        # state-dict keys of everything after the run).
        seq._modules[keys[i]] = fused
        for k in keys[i + 1:i + n]:
            seq._modules[k] = nn.Identity()
        rep._fused(FuseEntry(where, match.pattern, _with_note(type(fused).__name__, match.note)), match.mods)
        i += n


def _bn_config(bn):
    return (bn.momentum, bn.eps, bn.affine, bn.track_running_stats, bn.training, bn.running_mean is None)


# ----------------------------------------------------------------------------- torch.fx forwards
class _OneLevelTracer(fx.Tracer):
    """Traces only the module's own forward: every submodule call is one node."""

    def is_leaf_module(self, m, qualname):
        return True


def _trace(module) -> fx.Graph:
    """The graph of ``module``'s own forward, traced on a shallow copy whose own parameters and
    buffers are clones: tracing runs the forward's tensor code for real (a BatchNorm subclass
    counting ``num_batches_tracked``, say), and ``fuse`` must leave the model's state as it was.
    Submodules are leaves: tracing does not call them."""
    stand_in = copy.copy(module)
    stand_in.__dict__ = dict(module.__dict__)
    stand_in._modules = dict(module._modules)
    with torch.no_grad():
        stand_in._parameters = {k: None if p is None else nn.Parameter(p.clone(), p.requires_grad)
                                for k, p in module._parameters.items()}
        stand_in._buffers = {k: None if b is None else b.clone() for k, b in module._buffers.items()}
    graph = _OneLevelTracer().trace(stand_in)
    # Tensor constants the tracer stored on the stand-in (``_tensor_constant0``) go with the graph.
    graph._uresnet_constants = {node.target: getattr(stand_in, node.target) for node in graph.nodes
                                if node.op == "get_attr" and "." not in node.target
                                and node.target not in module.__dict__ and not hasattr(module, node.target)}
    return graph


# call_function / call_method targets -> the module computing the same thing (for matching)
_FUNCTIONS = {
    F.relu: lambda input, inplace=False: nn.ReLU(),
    torch.relu: lambda input: nn.ReLU(),
    F.silu: lambda input, inplace=False: nn.SiLU(),
    F.leaky_relu: lambda input, negative_slope=0.01, inplace=False: nn.LeakyReLU(negative_slope),
    F.gelu: lambda input, approximate="none": nn.GELU(approximate),  # seen, to be reported as not fused
    F.relu6: lambda input, inplace=False: nn.ReLU6(),
    F.hardswish: lambda input, inplace=False: nn.Hardswish(),
    F.pixel_shuffle: lambda input, upscale_factor: nn.PixelShuffle(upscale_factor),
    F.adaptive_avg_pool2d: lambda input, output_size: nn.AdaptiveAvgPool2d(output_size),
    F.channel_shuffle: lambda input, groups: nn.ChannelShuffle(groups),
    torch.channel_shuffle: lambda input, groups: nn.ChannelShuffle(groups),
    F.interpolate: lambda input, size=None, scale_factor=None, mode="nearest", align_corners=None,
    recompute_scale_factor=None, antialias=False: (
        None if antialias else nn.Upsample(size, scale_factor, mode, align_corners, recompute_scale_factor)),
}
_METHODS = {"relu": nn.ReLU, "relu_": nn.ReLU}


def _node_modules(node, root):
    """The modules a graph node runs (a list, see ``_flat``), or None if it is something else
    or takes a tensor other than its first argument."""
    args, kwargs = node.args, node.kwargs
    if not args or not isinstance(args[0], fx.Node) or any(isinstance(a, fx.Node) for a in _leaves((args[1:], kwargs))):
        return None
    try:
        if node.op == "call_module" and len(args) == 1 and not kwargs:
            return _flat(root.get_submodule(node.target)) or None
        if node.op == "call_function" and node.target in _FUNCTIONS:
            module = _FUNCTIONS[node.target](*args, **kwargs)
            return None if module is None else [module]
        if node.op == "call_method" and node.target in _METHODS and len(args) == 1 and not kwargs:
            return [_METHODS[node.target]()]
    except (TypeError, ValueError, AttributeError):  # unexpected arguments: not one of ours
        return None
    return None


def _leaves(tree):
    out = []
    fx.node.map_aggregate(tree, lambda a: out.append(a) or a)
    return out


def _fuse_traced(module, path, rep):
    try:
        graph = _trace(module)
    except Exception as error:  # noqa: BLE001 - any tracing failure means: leave it as it is
        if _has_candidates(module):
            msg = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
            rep.skipped.append(FuseEntry(path, f"forward of {type(module).__name__}",
                                         f"not traceable by torch.fx ({type(error).__name__}: {msg})"))
        return module
    new_modules, consumed, found = {}, set(), []
    _rewrite_chains(graph, module, new_modules, consumed, found, path, rep)
    _rewrite_cats(graph, module, new_modules, consumed, found, path, rep)
    if not new_modules:
        return module
    if not _same_in_both_modes(module):
        for entry in found:
            rep.skipped.append(FuseEntry(entry.path, entry.pattern, "the forward differs between train and eval mode"))
        return module
    graph.lint()
    whole = _whole_forward(graph, module, new_modules)
    if whole is not None:  # the forward is one fused module (an ASPP): that module replaces it
        for entry in found:
            rep._fused(entry, entry.modules)
        return whole
    root = nn.Module()
    root._modules.update(module._modules)
    root._modules.update(new_modules)
    root._parameters.update(module._parameters)
    root._buffers.update(module._buffers)
    for name, value in graph._uresnet_constants.items():
        setattr(root, name, value)
    gm = fx.GraphModule(root, graph, type(module).__name__)
    gm.training = module.training
    # The graph keeps only what its forward uses; keep the rest too (except what was fused away).
    for name, child in module._modules.items():
        if name not in gm._modules and child is not None and not any(m in consumed for m in child.modules()):
            gm._modules[name] = child
    for store in ("_parameters", "_buffers"):
        for name, value in getattr(module, store).items():
            if not hasattr(gm, name):
                getattr(gm, store)[name] = value
    for entry in found:
        rep._fused(entry, entry.modules)
    return gm


def _whole_forward(graph, module, new_modules):
    """The fused module that computes all of ``module``'s forward and holds all its state, or None."""
    nodes = list(graph.nodes)
    if not (len(nodes) == 3 and [n.op for n in nodes] == ["placeholder", "call_module", "output"]
            and nodes[1].target in new_modules and nodes[1].args == (nodes[0],) and nodes[2].args == (nodes[1],)):
        return None
    fused = new_modules[nodes[1].target]
    held = {id(t) for t in fused.state_dict(keep_vars=True).values()}
    if any(id(t) not in held for t in module.state_dict(keep_vars=True).values()):
        return None
    return fused


def _has_candidates(module) -> bool:
    return any(isinstance(m, (nn.PixelShuffle, nn.Upsample)) or (isinstance(m, nn.Conv2d) and m.dilation[0] > 1)
               for m in module.modules())


def _same_in_both_modes(module) -> bool:
    """A traced graph is one path through the forward: refuse forwards that branch on
    ``self.training`` (every module's mode is restored afterwards)."""
    modes = {m: m.training for m in module.modules()}
    try:
        codes = []
        for mode in (True, False):
            module.train(mode)
            codes.append(_trace(module).python_code("self").src)
        return codes[0] == codes[1]
    except Exception:  # noqa: BLE001 - not a forward we can read: not a pooling branch of ours
        return False
    finally:
        for m, mode in modes.items():
            m.training = mode


def _free_name(base, module, new_modules):
    name, k = base, 0
    while name in new_modules or hasattr(module, name):
        k += 1
        name = f"{base}_{k}"
    return name


def _call_counts(graph):
    counts = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _shared_stateful(nodes, root, counts):
    """Names of stateful modules among ``nodes`` that the forward also calls elsewhere (they
    cannot be folded into a fused module)."""
    shared = []
    for n in nodes:
        if n.op == "call_module" and counts[n.target] > 1:
            m = root.get_submodule(n.target)
            if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
                shared.append(n.target)
    return shared


def _chain(node, root):
    """(node, modules) of the straight run of module-like nodes starting at ``node``."""
    units = []
    while True:
        mods = _node_modules(node, root)
        if mods is None:
            return units
        units.append((node, mods))
        users = list(node.users)
        if len(users) != 1 or users[0].args[:1] != (node,):
            return units
        node = users[0]


def _rewrite_chains(graph, module, new_modules, consumed, found, path, rep):
    counts = _call_counts(graph)
    erased = set()
    for node in list(graph.nodes):
        if node in erased:
            continue
        first = _node_modules(node, module)
        if not first or not isinstance(first[0], (nn.PixelShuffle, nn.Upsample)):
            continue
        units = _chain(node, module)
        result = _match_units([u for _, u in units], 0)
        if result is None:
            continue
        match, n = result
        nodes = [nd for nd, _ in units[:n]]
        shared = _shared_stateful(nodes, module, counts)
        if n and shared:
            match, n = dataclasses.replace(match, reason=f"{', '.join(shared)} also called elsewhere in forward"), 0
        if not n:
            rep.skipped.append(FuseEntry(path, match.pattern + " in forward", match.reason, match.mods))
            continue
        fused = match.build()
        # The fused module takes the name of the first module it replaces where that is free.
        first_name = nodes[0].target if nodes[0].op == "call_module" else "fused"
        reuse = nodes[0].op == "call_module" and counts[first_name] == 1 and "." not in first_name
        name = first_name if reuse else _free_name(first_name.replace(".", "_") + "_fused", module, new_modules)
        new_modules[name] = fused
        consumed.update(m for _, mods in units[:n] for m in mods)
        with graph.inserting_before(nodes[0]):
            new = graph.call_module(name, (nodes[0].args[0],))
        nodes[-1].replace_all_uses_with(new)
        for nd in reversed(nodes):
            graph.erase_node(nd)
            erased.add(nd)
        found.append(FuseEntry(path, match.pattern + " in forward",
                               _with_note(f"{type(fused).__name__} ({name})", match.note), match.mods))


@dataclasses.dataclass
class _Branch:
    input: fx.Node
    nodes: list
    conv: nn.Conv2d
    bn: nn.Module | None
    act: nn.Module | None
    problem: str

    def key(self):
        return (self.input, self.bn is None, self.bn is not None and _bn_config(self.bn), _act_config(self.act),
                self.conv.weight.dtype, self.conv.weight.device)


def _branch(t, root, counts):
    """The conv (-> BN) (-> act) branch ending in cat input ``t``, or None."""
    nodes = []
    while isinstance(t, fx.Node) and len(t.users) == 1 and len(nodes) < 3:
        mods = _node_modules(t, root)
        if mods is None:
            return None
        nodes.insert(0, (t, mods))
        if isinstance(mods[0], nn.Conv2d):
            break
        t = t.args[0]
    flat = [m for _, mods in nodes for m in mods]
    if not flat or not isinstance(flat[0], nn.Conv2d):
        return None
    conv, rest = flat[0], flat[1:]
    problem = ""
    depthwise = conv.groups == conv.in_channels > 1
    if rest and isinstance(rest[0], nn.Conv2d) and depthwise and rest[0].kernel_size == (1, 1):
        rest.pop(0)  # depthwise + pointwise: a separable branch
        problem = "separable (depthwise + pointwise) convolution: multi_dilation_conv2d takes dense ones"
    bn = rest.pop(0) if rest and isinstance(rest[0], _BatchNorm) else None
    if rest and _other_activation(rest[0]):
        problem = problem or f"activation {_other_activation(rest[0])} ({_ACTIVATION_NOTE})"
        rest.pop(0)
    act = rest.pop(0) if rest and _is_plain(rest[0], _ACTIVATIONS) else None
    if rest:
        return None
    problem = problem or _conv_problem(conv, None) or (bn is not None and _bn_problem(bn, conv.out_channels)) or ""
    hooked = [type(m).__name__ for m in flat if m._forward_hooks or m._forward_pre_hooks]
    shared = _shared_stateful([nd for nd, _ in nodes], root, counts)
    problem = problem or (f"forward hooks on {', '.join(hooked)}" if hooked else "") or (
        f"{', '.join(shared)} also called elsewhere in forward" if shared else "")
    return _Branch(nodes[0][0].args[0], [nd for nd, _ in nodes], conv, bn, act, problem)


_BROADCAST_MODES = ("nearest", "bilinear")  # from a 1x1 map: the value everywhere, exactly


def _is_interpolate(node) -> bool:
    return node.op == "call_function" and node.target is F.interpolate and bool(node.args)


def _pooling_chain(t, x, root):
    """(nodes, modules) of an image-pooling branch ``interpolate(f(AdaptiveAvgPool2d(1)(x)))``
    ending in ``t`` (f: modules run one after the other), or None."""
    if not (isinstance(t, fx.Node) and _is_interpolate(t) and len(t.users) == 1):
        return None
    mode = t.kwargs.get("mode", t.args[3] if len(t.args) > 3 else "nearest")
    if mode not in _BROADCAST_MODES:
        return None
    nodes, mods, cur = [t], [], t.args[0]
    while isinstance(cur, fx.Node) and cur is not x and len(nodes) < 8:
        unit = _node_modules(cur, root)
        if unit is None or len(cur.users) != 1:
            return None
        nodes.insert(0, cur)
        mods = unit + mods
        cur = cur.args[0]
    if cur is not x or not mods or not _is_plain(mods[0], nn.AdaptiveAvgPool2d) \
            or mods[0].output_size not in (1, (1, 1)):
        return None
    return nodes, mods


def _pooling_branch(t, x, root):
    """(nodes to erase, pooling modules) of the image-pooling branch ending in cat input ``t``,
    written in this forward or as a submodule whose own forward is one (torchvision's and
    smp's ASPPPooling), or None."""
    found = _pooling_chain(t, x, root)
    if found is not None:
        return found
    if not (isinstance(t, fx.Node) and t.op == "call_module" and t.args == (x,) and not t.kwargs
            and len(t.users) == 1):
        return None
    sub = root.get_submodule(t.target)
    if _is_plain(sub, nn.Sequential) or not sub._modules or sub._forward_hooks or sub._forward_pre_hooks:
        return None
    try:
        graph = _trace(sub)
    except Exception:  # noqa: BLE001 - not a forward we can read: not a pooling branch of ours
        return None
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    outputs = [n for n in graph.nodes if n.op == "output"]
    if len(inputs) != 1 or len(outputs) != 1 or not isinstance(outputs[0].args[0], fx.Node):
        return None
    inner = _pooling_chain(outputs[0].args[0], inputs[0], sub)
    return None if inner is None else ([t], inner[1])


def _projection(node, root, counts, channels):
    """The module projecting cat ``node``'s output (a 1x1 Conv2d, or a plain Sequential
    starting with one) as (user node, module), or None with why."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module" or users[0].args != (node,) or users[0].kwargs:
        return None, "the concatenation is not the input of one module call"
    project = root.get_submodule(users[0].target)
    conv = project[0] if _is_plain(project, nn.Sequential) and len(project) else project
    if not (_is_plain(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.padding in ((0, 0), "valid") and conv.in_channels == channels):
        return None, f"{type(conv).__name__} after the concatenation (need a 1x1 Conv2d of all its channels)"
    if counts[users[0].target] > 1 or any(m._forward_hooks or m._forward_pre_hooks for m in project.modules()):
        return None, "the projection is called elsewhere or has hooks"
    return (users[0], project), ""


@dataclasses.dataclass
class _AsppMatch:
    pattern: str
    why: str = ""          # why it is passed over ("": it fuses)
    build: object = None   # () -> the fused ASPP
    input: fx.Node = None
    user: fx.Node = None   # the projection's call, which the fused module replaces
    erase: list = dataclasses.field(default_factory=list)  # the nodes it replaces, users first
    modules: tuple = ()


def _match_aspp(node, tensors, branches, root, counts):
    """An ASPP at cat ``node``: conv branches (one BatchNorm configuration and activation) and
    one image-pooling branch on the same input, concatenated, then a 1x1 projection. None
    without a pooling branch among conv branches."""
    convs = [b for b in branches if b is not None]
    if not convs:
        return None
    x = convs[0].input
    pools = [(i, _pooling_branch(t, x, root)) for i, t in enumerate(tensors) if branches[i] is None]
    pools = [(i, p) for i, p in pools if p is not None]
    if len(pools) != 1:
        return None
    position, (pool_nodes, pool_mods) = pools[0]
    match = _AsppMatch(f"ASPP ({len(convs)} conv branches, dilations {[b.conv.dilation[0] for b in convs]}, "
                       "image pooling)")
    if len(tensors) != len(convs) + 1:
        match.why = "an input of the concatenation is neither a conv branch nor the pooling branch"
    elif any(b.problem for b in convs):
        match.why = "; ".join(f"branch {i}: {b.problem}" for i, b in enumerate(convs) if b.problem)
    elif len({b.key() for b in convs}) != 1:
        match.why = "the branches differ in input, BatchNorm configuration, activation, dtype or device"
    if match.why:
        return match
    pool_convs = [m for m in pool_mods if isinstance(m, nn.Conv2d)]
    pool_channels = pool_convs[-1].out_channels if pool_convs else convs[0].conv.in_channels
    projection, match.why = _projection(node, root, counts, sum(b.conv.out_channels for b in convs) + pool_channels)
    if match.why:
        return match
    match.user, project = projection
    match.input = x
    match.build = lambda: unn.ASPP.from_parts([(b.conv, b.bn, b.act) for b in convs], pool_mods, project, position)
    match.erase = ([match.user, node] + [nd for b in reversed(convs) for nd in reversed(b.nodes)]
                   + list(reversed(pool_nodes)))
    match.modules = (tuple(m for b in convs for m in (b.conv, b.bn, b.act) if m is not None) + tuple(pool_mods)
                     + (project,))
    return match


def _erase_with_dead_inputs(graph, nodes):
    """Erase ``nodes`` (users first), then what only they used (``x.shape`` for a size)."""
    for nd in nodes:
        inputs = [a for a in _leaves((nd.args, nd.kwargs)) if isinstance(a, fx.Node)]
        graph.erase_node(nd)
        for a in inputs:
            if not a.users and a.op in ("call_function", "call_method") and a.target in (getattr, "size", _getitem):
                _erase_with_dead_inputs(graph, [a])


def _rewrite_aspp(graph, node, tensors, branches, module, counts, new_modules, consumed, found, path, rep):
    """Fuses the ASPP at cat ``node`` if there is one: "fused", "reported" (passed over, with
    why), or None (no ASPP)."""
    match = _match_aspp(node, tensors, branches, module, counts)
    if match is None:
        return None
    if match.why:
        rep.skipped.append(FuseEntry(path, match.pattern + " in forward", match.why))
        return "reported"  # its conv branches may still fuse on their own
    fused = match.build()
    name = _free_name("aspp_fused", module, new_modules)
    new_modules[name] = fused
    consumed.update(match.modules)
    with graph.inserting_before(match.user):
        new = graph.call_module(name, (match.input,))
    match.user.replace_all_uses_with(new)
    _erase_with_dead_inputs(graph, match.erase)
    found.append(FuseEntry(path, match.pattern + " in forward",
                           f"ASPP ({name}; the pooling branch as a per-image bias)", match.modules))
    return "fused"


def _rewrite_cats(graph, module, new_modules, consumed, found, path, rep):
    counts = _call_counts(graph)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.cat or not node.args:
            continue
        tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim not in (1, -3) or not isinstance(tensors, (list, tuple)):
            continue
        branches = [_branch(t, module, counts) if tensors.count(t) == 1 else None for t in tensors]
        aspp = _rewrite_aspp(graph, node, tensors, branches, module, counts, new_modules, consumed, found, path, rep)
        if aspp == "fused":
            continue
        problems = [] if aspp == "reported" else [  # reported with the ASPP
            f"{_names([b.conv])}({b.conv.in_channels}, {b.conv.out_channels}): {b.problem}"
            for b in branches if b is not None and b.problem]
        new_tensors, j, fused_here = [], 0, []
        while j < len(tensors):
            b, k = branches[j], j + 1
            if b is not None and not b.problem:
                while k < len(tensors) and branches[k] is not None and not branches[k].problem \
                        and branches[k].key() == b.key():
                    k += 1
            if k - j < 2:
                new_tensors.append(tensors[j])
                j += 1
                continue
            run = branches[j:k]
            fused = unn.MultiDilationConv2d.from_branches([(r.conv, r.bn, r.act) for r in run])
            name = _free_name("branches_fused", module, new_modules)
            new_modules[name] = fused
            consumed.update(m for r in run for nd in r.nodes for m in _node_modules(nd, module))
            with graph.inserting_before(node):
                new_tensors.append(graph.call_module(name, (b.input,)))
            fused_here.append((run, name, fused))
            j = k
        if not fused_here:
            if len([b for b in branches if b is not None]) >= 2 and problems:
                rep.skipped.append(FuseEntry(path, "torch.cat of conv branches in forward", "; ".join(problems)))
            continue
        node.args = (type(tensors)(new_tensors),) + tuple(node.args[1:])
        for run, name, fused in fused_here:
            for r in run:
                for nd in reversed(r.nodes):
                    graph.erase_node(nd)
            pattern = f"torch.cat of {len(run)} conv branches (dilations {[r.conv.dilation[0] for r in run]})"
            found.append(FuseEntry(path, pattern + " in forward", f"{type(fused).__name__} ({name})",
                                   tuple(m for r in run for m in (r.conv, r.bn, r.act) if m is not None)))
        if problems:
            rep.skipped.append(FuseEntry(path, "torch.cat of conv branches in forward", "; ".join(problems)))


# ----------------------------------------------------------------------------- inference: BatchNorm folding
def _folded_conv(conv: nn.Conv2d, bn, repeat: int = 1) -> nn.Conv2d:
    """A copy of ``conv`` with the eval-mode ``bn`` after it folded in (torch's helper); each
    channel of ``bn`` covers ``repeat`` consecutive channels of ``conv`` (r*r before a pixel
    shuffle by r)."""
    def per_conv_channel(t):
        return t if t is None or repeat == 1 else t.repeat_interleave(repeat)
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        folded.weight, folded.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, per_conv_channel(bn.running_mean), per_conv_channel(bn.running_var), bn.eps,
            per_conv_channel(bn.weight), per_conv_channel(bn.bias))
    return folded


def _is_timm_batch_norm_act(module) -> bool:
    """timm's BatchNormAct2d (BatchNorm -> drop -> act in one module), its forward not overridden."""
    forward = type(module).forward
    return (isinstance(module, _BatchNorm) and forward.__module__ == "timm.layers.norm_act"
            and forward.__qualname__ == "BatchNormAct2d.forward")


def _fold_plan(conv, bn):
    """(folded conv, what replaces ``bn``, pattern) when ``bn`` can be folded into ``conv``, else None."""
    if not _is_plain(conv, nn.Conv2d) or conv._forward_hooks or conv._forward_pre_hooks or bn._forward_hooks \
            or bn._forward_pre_hooks or bn.training or conv.training or getattr(bn, "running_mean", None) is None:
        return None
    if isinstance(bn, unn.PixelShuffleBN):
        r = bn.upscale_factor
        if conv.out_channels != bn.num_features * r * r:
            return None
        act = unn.activation_module(bn.activation)
        rest = nn.PixelShuffle(r) if isinstance(act, nn.Identity) else nn.Sequential(nn.PixelShuffle(r), act)
        return _folded_conv(conv, bn, r * r), rest.eval(), "Conv2d -> PixelShuffleBN"
    if bn.num_features != conv.out_channels:
        return None
    if _is_plain(bn, nn.BatchNorm2d):
        return _folded_conv(conv, bn), nn.Identity(), "Conv2d -> BatchNorm2d"
    if _is_timm_batch_norm_act(bn):
        return _folded_conv(conv, bn), nn.Sequential(bn.drop, bn.act).eval(), f"Conv2d -> {type(bn).__name__}"
    return None


def _conv_bn_pairs(module):
    """(conv, bn) module pairs of ``module``'s own forward where ``bn`` takes ``conv``'s output
    and nothing else does: consecutive modules of a plain Sequential, or module calls in a
    traced forward (one level; each called once there), plain Sequentials opened up (a deep
    stem ending in a conv, then a BatchNorm)."""
    if _is_plain(module, nn.Sequential):
        flat = _flat(module)
        return list(zip(flat, flat[1:]))
    if isinstance(module, fx.GraphModule):  # a forward fuse() rewrote
        graph = module.graph
    elif type(module).__module__.startswith("torch.") or not module._modules:
        return []
    else:
        try:
            graph = _trace(module)
        except Exception:  # noqa: BLE001 - a forward torch.fx cannot read: nothing to fold here
            return []
    counts = _call_counts(graph)
    pairs = []
    for node in graph.nodes:
        users = list(node.users)
        if node.op == "call_module" and counts[node.target] == 1 and len(users) == 1:
            user = users[0]
            if user.op == "call_module" and counts[user.target] == 1 and user.args == (node,) and not user.kwargs:
                first, then = _flat(module.get_submodule(node.target)), _flat(module.get_submodule(user.target))
                if len(first) == 1 and isinstance(first[0], unn.ASPP) and len(first[0].project) == 1:
                    first = list(first[0].project)  # its output is its projection conv's (with the pooling bias)
                if first and then:
                    pairs.append((first[-1], then[0]))
    return pairs


def _fold_batch_norms(root: nn.Module, rep: FuseReport) -> None:
    """Fold every eval-mode BatchNorm2d (timm's BatchNormAct2d, PixelShuffleBN: their BatchNorm)
    that directly follows a plain Conv2d into it, as ONNX Runtime does: the conv becomes a
    folded copy (``torch.nn.utils.fusion.fuse_conv_bn_weights``), the BatchNorm an
    ``nn.Identity`` (or what it ran after its normalisation: timm's drop and act, the pixel
    shuffle and activation). Pairs are looked for in plain Sequentials and traced forwards;
    inside the fused modules, in ASPP's pooling branch and projection, AtrousBlock's 1x1 conv
    and BatchNorm, and the branches of MultiDilationConv2d and ASPP (they fold their BatchNorms
    at every call in eval; folded once here, the modules run without them). A module that
    appears twice in the model is left as it is."""
    places = {}
    for name, m in root.named_modules(remove_duplicate=False):
        places.setdefault(m, []).append(name.removeprefix("model").lstrip("."))
    replace = {}  # module -> its replacement

    def plan(conv, bn):
        if any(m in replace or len(places.get(m, ())) != 1 for m in (conv, bn)):
            return None
        return _fold_plan(conv, bn)

    def fold(conv, bn, planned=None):
        planned = planned or plan(conv, bn)
        if planned is not None:
            replace[conv], replace[bn], pattern = planned
            rep.folded.append(FuseEntry(places[bn][0], pattern, f"folded into {places[conv][0]}", (conv, bn)))

    inside = {m for f in places if isinstance(f, _FUSED_TYPES) for m in f.modules() if m is not f}
    for m in places:
        if isinstance(m, (unn.MultiDilationConv2d, unn.ASPP)) and m.norm:
            branches = m.branches if isinstance(m, unn.MultiDilationConv2d) else m.convs[:-1]
            plans = [plan(b[0], b[1]) for b in branches]
            if all(p is not None for p in plans):  # all or none: the module then runs without BatchNorm
                for b, p in zip(branches, plans):
                    fold(b[0], b[1], p)
                m.norm = False
        if isinstance(m, unn.ASPP):
            for seq in (m.convs[-1], m.project):
                for conv, bn in zip(seq, list(seq)[1:]):
                    fold(conv, bn)
        elif isinstance(m, unn.AtrousBlock):
            fold(m.conv, m.bn_out)
        elif m not in inside and not isinstance(m, _FUSED_TYPES):
            for conv, bn in _conv_bn_pairs(m):
                fold(conv, bn)
    for parent in list(root.modules()):
        for name, child in list(parent._modules.items()):
            if child in replace:
                parent._modules[name] = replace[child]
    rep.batch_norms_left = sum(isinstance(m, (_BatchNorm, unn.PixelShuffleBN)) for m in root.modules())
