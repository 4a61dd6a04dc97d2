"""The recipe's levers: EMA, MixUp/CutMix, flip TTA, progressive resizing, model.adapt=auto."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import ClassVar

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from transfer.core.errors import ConfigError
from transfer.core.preprocess import Preprocess
from transfer.data import CIFAR10Data
from transfer.data.batch_augment import BatchAugment
from transfer.models import model_preprocess, resolve_adapt
from transfer.training.ema import EMA, ema_update
from transfer.training.finetune import StagedFinetuning
from transfer.training.mix import BatchMix
from transfer.training.module import Classifier
from transfer.training.progressive import ProgressiveResize

# The tiny test architectures are registered for each test of this module only (conftest.tiny_models).
pytestmark = pytest.mark.usefixtures("tiny_models")
ADAM = {"_target_": "torch.optim.Adam", "lr": 0.01}
MODEL = {"name": "tiny_test_cnn", "pretrained": False}


def _fit(root: Path, callbacks: list[L.Callback], epochs: int = 2, **module_args) -> tuple[Classifier, L.Trainer]:
    L.seed_everything(0)
    pre = model_preprocess(MODEL["name"], "native", None, CIFAR10Data.native_size)
    dm = CIFAR10Data(str(root), download=False, val_size=6, num_workers=0, batch_size=8, preprocess=pre)
    module = Classifier(MODEL, dm.classes, ADAM, preprocess=pre.to_dict(), **module_args)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=[StagedFinetuning(unfreeze_at_epoch=0), *callbacks],
    )
    trainer.fit(module, datamodule=dm)
    return module, trainer


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_ema_update_warms_up_then_holds_the_decay(device: str):
    # a CPU takes the decay to the host, a GPU keeps it on the device: the same average either way
    avg, cur = [torch.zeros(3, device=device)], [torch.ones(3, device=device)]
    ema_update(0.9, warmup=10)(avg, cur, torch.tensor(0, device=device))  # n=0: decay (1+0)/(10+0) = 0.1
    assert avg[0].cpu() == pytest.approx(torch.full((3,), 0.9))
    avg = [torch.zeros(3, device=device)]
    ema_update(0.9, warmup=10)(avg, cur, torch.tensor(1000, device=device))  # warmed up: decay 0.9
    assert avg[0].cpu() == pytest.approx(torch.full((3,), 0.1))
    ints = [torch.tensor([1])]
    ema_update(0.9, warmup=10)(ints, [torch.tensor([7])], torch.tensor(5))  # integer buffers are copied
    assert ints[0].item() == 7


def test_ema_weights_are_validated_checkpointed_and_tested(tiny_cifar: Path, tmp_path: Path):
    ema = EMA(decay=0.5, warmup=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    module, trainer = _fit(tiny_cifar, [ema, ckpt])
    averaged = ema._average_model.module.state_dict()  # type: ignore[union-attr]
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    conv = "model.backbone.0.weight"
    assert torch.equal(saved["state_dict"][conv], averaged[conv])
    assert not torch.equal(saved["state_dict"][conv], saved["current_model_state"][conv])  # live weights kept apart
    trainer.test(module, datamodule=trainer.datamodule, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    assert torch.equal(module.model.backbone[0].weight, averaged[conv])  # the test ran on the EMA, not the live weights
    assert torch.equal(Classifier.from_checkpoint(tmp_path / "last.ckpt").model.backbone[0].weight, averaged[conv])


def test_ema_rejects_a_decay_outside_zero_one():
    with pytest.raises(ConfigError, match="decay"):
        EMA(decay=1.0)


def test_mix_gives_soft_targets_that_sum_to_one_and_mixed_images():
    torch.manual_seed(0)
    images, targets = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    mixed, soft = BatchMix(4, mixup_alpha=1.0, cutmix_alpha=1.0)(images, targets)
    assert soft.shape == (8, 4) and torch.allclose(soft.sum(1), torch.ones(8))
    assert (soft.max(1).values < 1).any() and not torch.equal(mixed, images)
    same, hard = BatchMix(4, mixup_alpha=1.0, prob=0.0)(images, targets)
    assert torch.equal(same, images) and torch.equal(hard.argmax(1), targets) and hard.max() == 1


def test_training_with_cutmix_runs_and_tracks_accuracy_against_the_dominant_class(tiny_cifar: Path):
    mix = {"cutmix_alpha": 1.0, "mixup_alpha": 0.2}
    _, trainer = _fit(tiny_cifar, [], epochs=1, mix=mix)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    # One step by hand, the mixer's random draws replayed, with logits that pick each mixed image's dominant
    # class: the loss takes the soft targets, and the accuracy is 1 where the original labels would give less.
    module = Classifier(MODEL, ["a", "b", "c"], ADAM, mix=mix)
    images, targets = torch.rand(8, 3, 32, 32), torch.arange(8) % 3
    for seed in range(100):  # a draw where some image is dominated by the one pasted or blended into it
        torch.manual_seed(seed)
        _, soft = module.mix(images, targets)
        if (soft.argmax(1) != targets).any():
            break
    module.forward = lambda x: 10 * soft  # type: ignore[method-assign]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer warns and does nothing
        loss = module.training_step((images, targets), 0)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(10 * soft, soft))
    assert module.train_acc.compute() == 1.0


@pytest.mark.parametrize("args", [{"mixup_alpha": -1}, {"prob": 2}])
def test_bad_mix_settings_are_config_errors(args: dict):
    with pytest.raises(ConfigError, match="mix"):
        BatchMix(3, **args)


def test_tta_averages_the_logits_of_the_image_and_its_mirror():
    module = Classifier(MODEL, ["a", "b", "c"], ADAM, tta=True).eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        expected = (module(x) + module(x.flip(-1))) / 2
        assert torch.allclose(module.predict_logits(x), expected)
        assert not torch.allclose(module.predict_logits(x), module(x))
        scores = module.predict_step(x, 0)
        assert torch.allclose(scores.logits, expected) and scores.target is None


def test_evaluation_runs_a_folded_copy_built_once_per_evaluation_and_never_saved():
    module = Classifier(MODEL, ["a", "b", "c"], ADAM).eval()  # tiny_test_cnn: a conv and its BatchNorm
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        logits = module.predict_logits(x)
        folded = module.inference_model(x)
        assert folded is not module.model and module.inference_model(x) is folded  # built once
        assert torch.allclose(logits, module(x), atol=1e-5)
        module.on_validation_epoch_end()  # each evaluation ends by dropping it: the weights move on
        assert module.inference_model(x) is not folded
    assert not any("inference" in key for key in module.state_dict())
    module.train()
    assert module.predict_logits(x).requires_grad  # training runs the live model


def test_progressive_resize_grows_the_training_size_and_leaves_eval_at_full_size(tiny_cifar: Path):
    resize = ProgressiveResize(start_size=16, full_at_epoch=2)
    assert [resize.size_at(e, 32) for e in range(4)] == [16, 24, 32, 32]

    class Sizes(L.Callback):
        seen: ClassVar[list[tuple[str, int]]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append(("train", batch[0].shape[-1]))

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.seen.append(("val", batch[0].shape[-1]))

    _fit(tiny_cifar, [resize, Sizes()], epochs=3)
    train = [size for kind, size in Sizes.seen if kind == "train"]
    assert train[0] == 16 and train[-1] == 32 and 24 in train
    assert {size for kind, size in Sizes.seen if kind == "val"} == {32}


def test_batch_augment_train_size_overrides_only_training():
    aug = BatchAugment(Preprocess(64, (0.5,) * 3, (0.5,) * 3, native_size=32), {"crop_padding": 4, "hflip": True})
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    aug.train_size = 48
    assert aug(x, train=True).shape[-1] == 48 and aug(x, train=False).shape[-1] == 64


def test_adapt_auto_adapts_the_stem_only_for_small_inputs():
    assert resolve_adapt("efficientnet_lite0", "auto", 32) == "native"
    assert resolve_adapt("efficientnet_lite0", "auto", 64) == "resize"
    assert resolve_adapt("resnet18", "auto", 128) == "resize"
    assert resolve_adapt("resnet18", "auto", None, native_size=32) == "native"  # CIFAR at its own 32 px
    assert resolve_adapt("resnet18", "auto", None, native_size=None) == "resize"  # photos: the pretrained size
    assert resolve_adapt("vit_b_16", "auto", 32) == "resize"  # transformers keep their pretrained geometry
    assert resolve_adapt("resnet18", "native", 224) == "native"  # an explicit choice is kept


def test_lite0_on_cifar_defaults_to_the_unmodified_network_at_its_small_input_size():
    from transfer.models import create_model
    from transfer.models.core import resolve_preprocess

    assert resolve_adapt("efficientnet_lite0", "auto", None, native_size=32) == "resize"
    meta = create_model("efficientnet_lite0", 10, pretrained=False, adapt="resize").meta
    assert resolve_preprocess(meta, None, native_size=32).image_size == 64
    assert resolve_preprocess(meta, None, native_size=None).image_size == 224  # photos: the pretrained size
    assert resolve_preprocess(meta, 96, native_size=32).image_size == 96  # an explicit size wins


def test_mix_with_both_alphas_zero_keeps_plain_class_targets():
    off = Classifier(MODEL, ["a", "b", "c"], ADAM, mix={"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "prob": 1.0})
    assert off.mix is None
    assert Classifier(MODEL, ["a", "b", "c"], ADAM, mix={"mixup_alpha": 0.2}).mix is not None
    with pytest.raises(ConfigError, match="mix"):
        Classifier(MODEL, ["a", "b", "c"], ADAM, mix={"mixup_alpha": -1.0})
