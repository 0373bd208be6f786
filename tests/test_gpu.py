"""What only a GPU can check: the compressed structures train and agree with the CPU on CUDA (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cstar_dsl.model.factorized import Tucker2Conv2d
from cstar_dsl.model.prune import channel_prune, weight_params
from cstar_dsl.model.zoo import SmallCnn
from cstar_dsl.train.attacks import Pgd
from cstar_dsl.train.optimize import adversarial_epoch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

WIDTHS = (16, "M", 32, "M", 64)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCnn(1, 10, WIDTHS).eval()


def test_a_factorized_conv_computes_the_same_on_the_gpu():
    conv = nn.Conv2d(32, 64, 3, padding=1).eval()
    factorized = Tucker2Conv2d.from_dense(conv, (8, 8)).eval()
    x = torch.randn(4, 32, 14, 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_cpu = factorized(x)
        on_gpu = factorized.cuda()(x.cuda()).cpu()
    assert torch.allclose(on_cpu, on_gpu, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_pruned_cnn_takes_adversarial_steps_on_the_gpu(precision, channels_last):
    model = _cnn()
    pruned = channel_prune(model, torch.zeros(1, 1, 28, 28), weight_params(model) // 4).model.cuda()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    pruned = pruned.to(memory_format=layout)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.rand(16, 1, 28, 28, generator=generator).cuda().to(memory_format=layout),
                torch.randint(0, 10, (16,), generator=generator).cuda()) for _ in range(3)]
    before = [p.detach().clone() for p in pruned.parameters()]
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.05)
    result = adversarial_epoch(pruned, batches, optimizer, Pgd(eps=0.3, step=0.1, steps=3), phase="test", epoch=0,
                               generator=torch.Generator(device="cuda").manual_seed(0), precision=precision)
    assert result.samples == 48 and torch.isfinite(torch.tensor(result.loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, pruned.parameters(), strict=True))
    assert all(p.dtype == torch.float32 for p in pruned.parameters())  # autocast leaves the weights in fp32
