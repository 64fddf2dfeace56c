"""The ops inside torch.compile(fullgraph=True): no graph break, same results as eager."""
import copy

import pytest
import torch
from torch import nn

import uresnet_ops


class Net(nn.Module):
    """One of each op, in training mode (running statistics updated inside the graph)."""

    def __init__(self):
        super().__init__()
        self.eucb = uresnet_ops.nn.EUCB(8, 12)
        self.atrous = uresnet_ops.nn.MultiDilationConv2d(12, 2, dilations=(1, 2, 3, 4), norm=False)
        self.shuffle_bn = uresnet_ops.nn.PixelShuffleBN(8, 2, activation="silu")

    def forward(self, x):
        return self.shuffle_bn(self.atrous(self.eucb(x)))


@pytest.mark.slow
def test_all_ops_compile_fullgraph_and_match_eager():
    eager = Net()
    compiled_net = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_net, fullgraph=True)  # fullgraph: a graph break is an error
    x = torch.randn(2, 8, 5, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = compiled(xa), eager(xb)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.sum().backward(), expected.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(compiled_net.state_dict().items(), eager.state_dict().values(), strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for (name, a), b in zip(compiled_net.named_parameters(), eager.parameters(), strict=False):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)
    assert eager.eucb.up_dwc[2].num_batches_tracked.item() == 1
