"""PixelShuffleBN(sync=True) under torch.distributed (gloo, 2 CPU processes) equals one process
seeing the whole batch: forward, gradients of x / weight / bias, running statistics."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import uresnet_ops

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
