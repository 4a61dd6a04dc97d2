"""BatchNorm folding for inference: the same logits from fewer modules, and the original left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from transfer.models import create_model
from transfer.models.fold import conv_norm_pairs, fold_batchnorm


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _with_moved_statistics(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their initial 0/1, so that folding has work to do."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize(
    "build",
    [
        lambda: create_model(name="efficientnet_lite0", num_classes=10, adapt="resize"),  # timm BatchNormAct2d
        lambda: _with_moved_statistics(resnet18(num_classes=10)),  # torchvision conv -> BatchNorm2d
    ],
    ids=["efficientnet_lite0", "resnet18"],
)
def test_folding_gives_the_models_logits_without_its_norms_and_leaves_it_unchanged(build):
    model = build().eval()
    x = torch.randn(4, 3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
        folded = fold_batchnorm(model.train(), x[:2])
        assert folded is not model and not folded.training
        assert _norms(folded) == 0 < _norms(model)
        assert torch.allclose(folded(x), expected, atol=1e-4, rtol=1e-4)
    assert model.training  # its mode, weights and norms are as they were
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in folded.parameters())


class SharedOutput(nn.Module):
    """A convolution whose output feeds its norm and, unnormalised, the sum after it: folding would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_a_norm_whose_convolution_output_is_used_elsewhere_is_not_folded():
    model = _with_moved_statistics(SharedOutput())
    x = torch.randn(2, 3, 8, 8)
    assert conv_norm_pairs(model, x) == [("conv", "bn")]  # the hooks see the pair
    assert fold_batchnorm(model, x) is model  # the check against the original refuses the copy


def test_a_model_without_norms_after_convolutions_is_evaluated_as_it_is():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))  # the norm follows the ReLU
    assert conv_norm_pairs(model, torch.randn(2, 3, 8, 8)) == []
    assert fold_batchnorm(model, torch.randn(2, 3, 8, 8)) is model


def test_a_biased_convolution_and_a_norm_without_affine_parameters_fold_too():
    model = _with_moved_statistics(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=True),
            nn.BatchNorm2d(4, affine=False),
            nn.Conv2d(4, 2, 1, groups=2),  # grouped
            nn.BatchNorm2d(2),
        )
    )
    x = torch.randn(2, 3, 8, 8)
    folded = fold_batchnorm(model, x)
    with torch.no_grad():
        assert _norms(folded) == 0 and torch.allclose(folded(x), model.eval()(x), atol=1e-5)


def test_folding_under_autocast_still_folds_and_keeps_each_modules_own_mode():
    model = create_model(name="efficientnet_lite0", num_classes=10, adapt="resize")
    kept_in_eval = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()  # a frozen norm
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as an evaluation under trainer.precision=bf16-mixed
        folded = fold_batchnorm(model, x)
    assert folded is not model and _norms(folded) == 0
    assert model.training and not kept_in_eval.training
