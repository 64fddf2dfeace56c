"""The fused modules with ``sync=True`` under torch.distributed (gloo, 2 CPU processes) equal one
process seeing the whole batch (nn.SyncBatchNorm semantics): forward, gradients of x and of every
parameter, running statistics and num_batches_tracked. PixelShuffleBN, EUCB, EUCBStar,
MultiDilationConv2d and ASPP, on the cpu and reference backends."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import uresnet_ops
from uresnet_models.train import sync_batchnorm

WORLD = 2


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 12, 3, 5, generator=gen) * 2 + 3
    grad_out = torch.randn(4, 3, 6, 10, generator=gen)
    weight, bias = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    return x, grad_out, weight, bias


def _step(module, x, grad_out):
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(grad_out)
    return out.detach(), x.grad


def _module(weight, bias):
    module = uresnet_ops.nn.PixelShuffleBN(12, 2, activation="silu", momentum=0.3, sync=True)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    return module


def _worker(rank, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        x, grad_out, weight, bias = _data()
        module = _module(weight, bias)
        part = slice(rank * 2, rank * 2 + 2)  # each process sees half of the batch
        out, grad_x = _step(module, x[part], grad_out[part])
        grads = torch.stack([module.weight.grad, module.bias.grad])
        dist.all_reduce(grads)  # what DDP does with parameter gradients (here summed)
        torch.save(dict(out=out, grad_x=grad_x, grads=grads, running_mean=module.running_mean,
                        running_var=module.running_var), os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sync_equals_whole_batch_on_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]

    x, grad_out, weight, bias = _data()
    module = _module(weight, bias)  # not distributed here: plain whole-batch training step
    out, grad_x = _step(module, x, grad_out)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["out"] for r in results]), out, **tol)
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in results]), grad_x, **tol)
    for r in results:
        torch.testing.assert_close(r["grads"], torch.stack([module.weight.grad, module.bias.grad]), **tol)
        torch.testing.assert_close(r["running_mean"], module.running_mean, **tol)
        torch.testing.assert_close(r["running_var"], module.running_var, **tol)


def test_sync_inactive_without_process_group():
    # Not initialised (or world size 1): the plain op runs, nothing is synchronised.
    assert not uresnet_ops.distributed.sync_active(None, True, True)
    module = uresnet_ops.nn.PixelShuffleBN(8, 2, sync=True)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(module(x), uresnet_ops.nn.PixelShuffleBN(8, 2)(x))


# ----------------------------------------------------------------------------- every fused module
def _fused_modules():
    """name -> (module factory, input shape); BatchNorm parameters and statistics randomised."""
    from uresnet_ops.nn import ASPP, EUCB, EUCBStar, MultiDilationConv2d
    return {
        "eucb_bilinear_shuffle": (lambda: EUCB(6, 5, 2, mode="bilinear", shuffle_groups=3, activation="silu"),
                                  (4, 6, 3, 5)),
        "eucb_nearest_x3": (lambda: EUCB(4, 3, 3, mode="nearest", activation=("leaky_relu", 0.2)), (4, 4, 3, 3)),
        "eucb_star": (lambda: EUCBStar(8, 5, 2, stages=2), (4, 8, 3, 4)),
        "multi_dilation": (lambda: MultiDilationConv2d(5, (3, 4), (1, 3), (1, 2)), (4, 5, 7, 6)),
        "aspp": (lambda: ASPP(5, (2, 3), 4), (4, 5, 7, 7)),  # pooling, projection BN: plain (made synced)
    }


def _build(name):
    torch.manual_seed(1)
    make, shape = _fused_modules()[name]
    module = make()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0  # the processes' masks would differ from one process's
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen) * 2 + 1
    return module, x


def _train_steps(module, x, part, reduce):
    """Two training steps on ``x[part]``: outputs, input gradients, parameter gradients
    (summed over processes by ``reduce``, as DDP does) and the buffers after them."""
    outs, grads_x, grads_p = [], [], []
    for step in range(2):
        xs = x[part].clone().requires_grad_()
        out = module(xs)
        gen = torch.Generator().manual_seed(10 + step)
        grad_out = torch.randn((x.shape[0],) + out.shape[1:], generator=gen)[part]
        out.backward(grad_out)
        grads = [p.grad.clone() for p in module.parameters()]
        for g in grads:
            reduce(g)
        outs.append(out.detach()), grads_x.append(xs.grad), grads_p.append(grads)
        module.zero_grad()
    return dict(outs=outs, grads_x=grads_x, grads_p=grads_p, buffers=[b.clone() for b in module.buffers()])


def _modules_worker(rank, port, result_dir, backend):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        results = {}
        with uresnet_ops.use_backend(backend):
            for name in _fused_modules():
                module, x = _build(name)
                module = sync_batchnorm(module, torch.device("cpu"))  # as the trainer does under DDP
                assert module.sync
                half = x.shape[0] // WORLD
                results[name] = _train_steps(module, x, slice(rank * half, (rank + 1) * half), dist.all_reduce)
        torch.save(results, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_every_fused_module_synced_equals_whole_batch(tmp_path, backend):
    mp.spawn(_modules_worker, args=(_free_port(), str(tmp_path), backend), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]
    tol = dict(rtol=1e-4, atol=1e-5)
    with uresnet_ops.use_backend(backend):
        for name in _fused_modules():
            module, x = _build(name)  # one process, the whole batch, no synchronisation
            whole = _train_steps(module, x, slice(None), lambda g: None)
            for step in range(2):
                for key in ("outs", "grads_x"):
                    torch.testing.assert_close(torch.cat([r[name][key][step] for r in results]), whole[key][step],
                                               **tol, msg=f"{name} {key} step {step}")
                for r in results:
                    for got, want in zip(r[name]["grads_p"][step], whole["grads_p"][step]):
                        # sums that nearly cancel: rounding relative to the largest gradient
                        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 + 1e-5 * want.abs().max().item(),
                                                   msg=f"{name} grads step {step}")
            for r in results:
                for got, want in zip(r[name]["buffers"], whole["buffers"]):
                    torch.testing.assert_close(got, want, **tol, msg=f"{name} buffers")
