"""The divergence guard: the loss is checked on its device, the host reads the verdict at intervals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from transfer.core.errors import DivergenceError
from transfer.training.guard import DivergenceGuard


def fake_trainer(device: str = "cuda", log_every: int = 4) -> SimpleNamespace:
    group = [{"name": "head", "lr": 0.1}, {"name": "head.no_decay", "lr": 0.1}]
    return SimpleNamespace(
        global_step=0,
        log_every_n_steps=log_every,
        strategy=SimpleNamespace(root_device=torch.device(device)),
        optimizers=[SimpleNamespace(param_groups=group)],
        current_epoch=0,
        fit_loop=SimpleNamespace(
            epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace(ready=1)))
        ),
        checkpoint_callback=None,
    )


def steps(guard: DivergenceGuard, trainer: SimpleNamespace, losses: list[float]) -> tuple[int, str]:
    """Feed ``losses`` one step each; the step at which the guard raised (-1: never) and its message."""
    for i, value in enumerate(losses):
        trainer.global_step = i
        try:
            guard.on_before_backward(trainer, None, torch.tensor(value))  # type: ignore[arg-type]
        except DivergenceError as err:
            return i, str(err)
    return -1, ""


def test_on_an_accelerator_the_first_bad_loss_is_named_at_the_next_read():
    trainer, guard = fake_trainer("cuda", log_every=4), DivergenceGuard()
    at, message = steps(guard, trainer, [1.0, float("nan"), 2.0, 1.0, 1.0])
    assert at == 3  # the host reads after every 4th step
    assert "loss was nan (not finite) at epoch 1, step 1 (seen at step 3)" in message
    assert "learning rates head 0.1;" in message  # the no-decay twin shares the lr: named once


def test_on_a_cpu_every_step_is_read_before_it_applies():
    trainer = fake_trainer("cpu")
    at, message = steps(DivergenceGuard(), trainer, [1.0, 1.0, float("inf")])
    assert at == 2 and "at epoch 1, step 2 (batch 0 of the epoch)" in message


def test_a_bad_loss_between_reads_is_caught_before_validation_and_epoch_end():
    for hook in ("on_validation_start", "on_train_epoch_end"):
        trainer, guard = fake_trainer("cuda", log_every=100), DivergenceGuard(max_loss=5.0)
        trainer.training, trainer.state = True, SimpleNamespace(fn="fit")
        assert steps(guard, trainer, [1.0, 9.0, 1.0]) == (-1, "")  # no read yet
        with pytest.raises(DivergenceError, match=r"loss was 9 \(above .*max_loss=5.0\) at epoch 1, step 1"):
            getattr(guard, hook)(trainer, None)
        getattr(guard, hook)(trainer, None)  # reported once


def test_check_every_is_validated():
    with pytest.raises(ValueError, match="check_every"):
        DivergenceGuard(check_every=0)
