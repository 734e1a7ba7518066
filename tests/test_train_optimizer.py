"""qru.train.loop.make_optimizer: after a (fused) AdamW step a no-grad forward of qru's Linear sees
the updated weight, not a packed copy of the old one (oracle: F.linear on the weight as it is)."""
import torch
import torch.nn.functional as F

from qru.model.linear import Linear
from qru.train.loop import make_optimizer


def test_forward_after_step_uses_the_updated_weight(one_thread):
    torch.manual_seed(0)
    layer = Linear(64, 48, bias=False)
    x = torch.randn(32, 64)
    opt = make_optimizer(list(layer.parameters()), 1e-2, 0.0)
    assert opt.defaults["fused"]  # the kernel that does not bump _version
    for _ in range(3):
        with torch.no_grad():  # evaluation: the path that packs the weight where calibrated
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight.detach()), rtol=1e-5, atol=1e-5)
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
