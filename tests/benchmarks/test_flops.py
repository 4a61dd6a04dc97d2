"""The FLOP count per training image and the measured matmul peak behind the benchmarks' share-of-peak row."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from transfer.benchmarks.flops import peak_matmul_flops, training_flops_per_image


def test_a_training_image_costs_its_forward_and_the_backward_products_that_need_computing():
    a, b, c = 12, 7, 5
    model = nn.Sequential(nn.Linear(a, b, bias=False), nn.ReLU(), nn.Linear(b, c, bias=False))
    # forward 2ab + 2bc; backward: both weight gradients (2ab, 2bc) and the gradient into the first layer's
    # output (2bc), but none into the images, which need no gradient
    assert training_flops_per_image(model, torch.randn(4, a)) == 4 * a * b + 6 * b * c
    assert all(p.grad is None for p in model.parameters())


def test_a_convolution_counts_per_image_whatever_the_batch():
    model = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    one, four = (training_flops_per_image(model, torch.randn(n, 3, 16, 16)) for n in (1, 4))
    assert one == four == 2 * (2 * 3 * 9 * 8 * 16 * 16)  # forward and weight gradient, per image


def test_the_peak_is_the_fastest_product_of_its_repeats(monkeypatch: pytest.MonkeyPatch):
    clock = iter([0.0, 10.0, 10.5, 20.0, 20.25, 30.0, 30.4])  # the warm-up's start, then 0.5, 0.25, 0.4 s
    monkeypatch.setattr("transfer.benchmarks.flops.perf_counter", lambda: next(clock))
    peak = peak_matmul_flops(torch.device("cpu"), torch.float32, size=64, repeats=3)
    assert peak == pytest.approx(2 * 64**3 / 0.25)


def test_a_real_product_gives_a_finite_positive_rate():
    peak = peak_matmul_flops(torch.device("cpu"), torch.bfloat16, size=128, repeats=2)
    assert math.isfinite(peak) and peak > 0


@pytest.mark.parametrize("bias", [False, True])
def test_a_depthwise_convolution_costs_its_forward_once_more_for_its_weight_gradient(bias: bool):
    model = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=bias)
    forward = 2 * (8 * 1 * 9) * 16 * 16  # each of its 72 weights meets one input per output position
    assert training_flops_per_image(model, torch.randn(2, 8, 16, 16)) == 2 * forward


def test_a_frozen_stem_has_no_backward():
    stem, top = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    stem.weight.requires_grad_(False)
    dw = 2 * 72 * 16 * 16
    # the stem's forward; the top's forward, its weight gradient and none into the frozen stem's output
    assert training_flops_per_image(nn.Sequential(stem, top), torch.randn(1, 3, 16, 16)) == 2 * 216 * 256 + 2 * dw
