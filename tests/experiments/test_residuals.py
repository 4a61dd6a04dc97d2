"""Residual inspection: the measures on a block whose F is known, every residual family, the plain variant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transfer.experiments.residuals import inspect_blocks, instrument, measure, residual_blocks, train_plain_vs_residual
from transfer.models import create_model


def test_measures_on_a_hand_built_block_where_f_is_known():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    f = 2 * x  # F(x) = 2x: twice the input, same direction, gradient through F is 2x the shortcut's
    s = x  # identity shortcut
    g = torch.randn_like(x)
    rel, cos, grad_short, grad_res = measure(x, f, s, g)
    assert rel == pytest.approx(2.0) and cos == pytest.approx(1.0)
    assert grad_short == pytest.approx(float(g.norm())) and grad_res == pytest.approx(2 * float(g.norm()))
    rel, cos, *_ = measure(x, -0.5 * x, s, g)  # a block that cancels half of its input
    assert rel == pytest.approx(0.5) and cos == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "name, count, kind",
    [
        ("resnet18", 8, "BasicBlock"),
        ("resnet50", 16, "Bottleneck"),
        ("mobilenet_v2", 10, "InvertedResidual"),
        ("efficientnet_b0", 9, "MBConv"),
        ("efficientnet_lite0", 9, "InvertedResidual"),
    ],
)
def test_every_residual_family_is_measured(name: str, count: int, kind: str):
    torch.manual_seed(0)
    model = create_model(name, 10, pretrained=False)
    stats = inspect_blocks(model, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert len(stats) == count == len(residual_blocks(model)) and {s.kind for s in stats} == {kind}
    # Untrained, each branch is nearly orthogonal to the shortcut it adds to (|cos| ~ 0.1, where a tensor compared
    # with itself would give 1), and the gradient flows through both paths.
    for s in stats:
        assert s.rel_norm > 0 and abs(s.cos) < 0.5 and s.grad_shortcut > 0 and s.grad_residual > 0
    assert not any(hasattr(block, "forward") and "forward" in vars(block) for _, block in residual_blocks(model))


def test_instrumented_forward_equals_the_real_one_and_plain_drops_the_shortcut():
    torch.manual_seed(0)
    model = create_model("resnet18", 10, pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        with instrument(model):
            assert torch.allclose(model(x), reference, atol=1e-5)
        with instrument(model, plain=True):
            assert not torch.allclose(model(x), reference, atol=1e-3)
        assert torch.allclose(model(x), reference, atol=1e-5)  # restored


def test_plain_vs_residual_training_runs_both_variants_from_the_same_start():
    def make() -> nn.Module:
        torch.manual_seed(0)
        return create_model("resnet18", 3, pretrained=False)

    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))]
    result = train_plain_vs_residual(make, batches, steps=3)
    assert set(result) == {"residual", "plain"}
    for data in result.values():
        assert len(data["loss"]) == 3 and len(data["grad_norm"]) == 8 and all(g > 0 for g in data["grad_norm"])


def test_training_with_instrumented_blocks_keeps_no_activations():
    model = create_model("resnet18", 3, pretrained=False)
    with instrument(model, plain=True, record=False) as records:
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert records == []
