import torch
from torch import nn

from fxforge.testing.helpers import randomize_bn, reestimate_bn


def test_reestimate_bn_uses_the_average_statistics_of_the_batches():
    bn = nn.BatchNorm2d(3)
    batches = [torch.randn(4, 3, 5, 5) * 3 + 2 for _ in range(2)]
    reestimate_bn(bn, batches)
    assert not bn.training
    torch.testing.assert_close(bn.running_mean, torch.cat(batches).mean((0, 2, 3)))


def test_randomize_bn_makes_batch_norm_not_the_identity():
    bn = randomize_bn(nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 4, 3, 3)
    assert (bn(x) - x).abs().max() > 0.1
