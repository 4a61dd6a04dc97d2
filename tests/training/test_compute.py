from __future__ import annotations

import pytest
import torch
from torch import nn

from transfer.core.errors import ConfigError
from transfer.training.compute import apply_compute, resolve_precision


def test_auto_precision_is_fp32_on_cpu_and_explicit_values_pass_through(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "auto") == "32-true"
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert resolve_precision(16, "gpu") == 16


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_precision_on_gpu_prefers_bf16_where_supported(monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: str):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_precision("auto", "auto") == expected
    assert resolve_precision("auto", "cpu") == "32-true"


def test_channels_last_and_compile_keep_parameter_names():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    names = [n for n, _ in net.named_parameters()]
    apply_compute(net, channels_last=True, compile=True)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert [n for n, _ in net.named_parameters()] == names  # checkpoints load without compilation
    assert net._compiled_call_impl is not None
    plain = nn.Conv2d(3, 4, 3)
    apply_compute(plain, channels_last=False)
    assert plain.weight.is_contiguous()


def test_threads_follow_the_setting_or_the_cores_this_process_may_use():
    import os

    from transfer.training.compute import configure_threads

    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 == torch.get_num_threads()
        assert configure_threads(None) == len(os.sched_getaffinity(0)) == torch.get_num_threads()
        with pytest.raises(ConfigError, match="num_threads"):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)
