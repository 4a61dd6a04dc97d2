"""The LightningModule: a :class:`~transfer.models.TransferModel` trained with cross-entropy.

Checkpoints describe themselves: the hyperparameters rebuild the architecture, and a ``transfer`` entry
carries class names, preprocessing and the code version, so prediction needs nothing but the file.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from transfer.core.checkpoint_meta import (
    check_class_names,
    check_hparams,
    check_preprocess,
    refuse,
    trained_on_val,
)
from transfer.core.errors import ConfigError
from transfer.core.preprocess import Preprocess
from transfer.core.provenance import code_version
from transfer.data.batch import Batch, as_batch
from transfer.models import REGISTRY, TransferModel, create_model
from transfer.models.fold import fold_batchnorm
from transfer.training.finetune import finetune_plan
from transfer.training.mix import BatchMix
from transfer.training.optim import build_optimizer, build_scheduler, optimizer_lr, optimizer_settings
from transfer.training.param_groups import build_param_groups, describe

log = logging.getLogger(__name__)


class Scores(NamedTuple):
    """What ``Trainer.predict`` returns per batch: logits, and the targets where the data has them."""

    logits: Tensor
    target: Tensor | None


class Classifier(L.LightningModule):
    """Image classifier around a pretrained backbone and a new head.

    Args:
        model: ``create_model`` arguments (the ``model`` config group) without ``num_classes``.
        class_names: class names in label order; their number sizes the head.
        optimizer: the ``optimizer`` config group.
        scheduler: the ``scheduler`` config group, or ``None``.
        label_smoothing: cross-entropy label smoothing.
        mix: MixUp/CutMix of training batches (:class:`~transfer.training.mix.BatchMix` arguments), or ``None``.
        tta: test-time augmentation: average the logits of each test image and its mirror image.
        preprocess: the input the model's weights expect (``Preprocess.to_dict()``, as handed to the data
            module); checkpoints carry it, so prediction needs nothing but the file.
    """

    def __init__(
        self,
        model: dict[str, Any],
        class_names: list[str],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        mix: dict[str, Any] | None = None,
        tta: bool = False,
        preprocess: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.preprocess: Preprocess | None = Preprocess.from_dict(preprocess) if preprocess else None
        self.class_names = list(class_names)
        # Whether its validation images trained too (data.train_on_val; set by from_checkpoint): evaluate refuses
        # split=val for such a model whatever data config it is given.
        self.trained_on_val = False
        self.loaded_weights = "live"  # or "ema": which of a checkpoint's weights from_checkpoint loaded
        self.model: TransferModel = create_model(num_classes=len(self.class_names), **model)
        mix = mix or {}
        mixing = any(mix.get(k) for k in ("mixup_alpha", "cutmix_alpha"))
        self.mix = BatchMix(len(self.class_names), **mix) if mixing else None  # alphas 0: plain class targets
        n = len(self.class_names)
        self.train_acc = MulticlassAccuracy(n, average="micro")
        self.val_acc = MulticlassAccuracy(n, average="micro")
        self.test_acc = MulticlassAccuracy(n, average="micro")
        self._inference: list[nn.Module] = []  # in a list: not a submodule, so never in the state_dict

    @property
    def backbone(self) -> nn.Module:
        """The pretrained part; the finetuning callback freezes it (``requires_grad``) until it trains."""
        return self.model.backbone

    @property
    def head(self) -> nn.Module:
        """The new classifier (the neck, where a family has one, trains with it from the start)."""
        return self.model.head

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def inference_model(self, x: Tensor) -> nn.Module:
        """The network the evaluation runs: the model with its BatchNorms folded into their convolutions
        (:func:`~transfer.models.fold.fold_batchnorm`, 0.72x the eval forward of Lite0 on a CPU), built from the
        weights of the moment on the first call and kept until :meth:`release_inference_model` (each validation,
        test and prediction ends with it: the weights move in between, and the EMA swaps its own in first).

        Args:
            x: a batch the model takes (two of its images check the folded copy against the model).
        """
        if not self._inference:
            compiled = getattr(self.model, "_compiled_call_impl", None) is not None  # the compiler fuses itself
            self._inference.append(self.model if compiled else fold_batchnorm(self.model, x[:2]))
        return self._inference[0]

    def release_inference_model(self) -> None:
        """Drop the folded copy :meth:`inference_model` built (the next evaluation folds the weights it finds)."""
        self._inference.clear()

    # Dropped at each evaluation's start (an earlier one may have stopped part-way) and end (training moves on).
    def on_validation_epoch_start(self) -> None:
        self.release_inference_model()

    on_validation_epoch_end = on_test_epoch_start = on_test_epoch_end = on_validation_epoch_start
    on_predict_epoch_start = on_predict_epoch_end = on_validation_epoch_start

    def predict_logits(self, x: Tensor, tta: bool | None = None) -> Tensor:
        """Logits as the run's test uses them: with ``tta``, the mean of the image's and its mirror's.

        Args:
            x: normalised images.
            tta: flip TTA; ``None``: the run's ``tta`` setting.
        """
        model = self.model if self.training else self.inference_model(x)
        if self.hparams.get("tta") if tta is None else tta:
            return (model(x) + model(x.flip(-1))) / 2
        return model(x)

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        # y: class indices, or class probabilities after MixUp/CutMix (cross_entropy takes both)
        return F.cross_entropy(logits, y, label_smoothing=self.hparams["label_smoothing"])

    def _logits_and_targets(self, batch: Batch, test: bool = False) -> tuple[Tensor, Tensor]:
        batch = as_batch(batch)
        if batch.features:  # cached backbone features (finetune.cache_features): neck and head only
            return self.model.head(self.model.neck(batch.x)), batch.y
        if self.training:
            return self(batch.x), batch.y
        return self.predict_logits(batch.x, tta=None if test else False), batch.y

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        batch = as_batch(batch)
        if self.mix is not None and not batch.features:
            batch = Batch(*self.mix(batch.x, batch.y))
        logits, y = self._logits_and_targets(batch)
        loss = self._loss(logits, y)
        self.train_acc(logits, y.argmax(1) if y.ndim == 2 else y)
        n = len(y)  # told, not inferred: Lightning cannot tell which tensor of a batch counts images
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def _eval_step(self, batch: Batch, stage: str, metric: MulticlassAccuracy) -> Tensor:
        logits, y = self._logits_and_targets(batch, test=stage == "test")
        metric(logits, y)
        self.log(
            f"{stage}/loss", self._loss(logits, y), on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(y)
        )
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=True, batch_size=len(y))
        return logits.argmax(dim=1)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Logs test loss/accuracy; returns the predicted classes (the confusion matrix is built from them)."""
        return self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> Scores:
        """Logits as the test sees them (flip TTA when ``tta``), with the targets when the batch has them."""
        if isinstance(batch, Batch):
            return Scores(self.predict_logits(batch.x), batch.y)
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return Scores(self.predict_logits(x), None)

    def configure_optimizers(self) -> Any:
        # Every group that may ever train, built once (transfer/training/param_groups.py): the finetuning
        # callback only switches requires_grad, and the scheduler holds a frozen group's lr at 0.
        plan = finetune_plan(self._trainer)
        lr = optimizer_lr(self.hparams["optimizer"])
        groups = build_param_groups(self.model, plan, lr)
        settings = self._optimizer_settings()
        optimizer = build_optimizer(settings, groups)
        scheduler = build_scheduler(
            self.hparams["scheduler"],
            optimizer,
            total_steps=self.trainer.estimated_stepping_batches if self._trainer else None,
        )
        if self._trainer is None or self.trainer.is_global_zero:
            unfused = settings.get("fused") is False and bool(self.hparams["optimizer"].get("fused"))
            note = "; unfused, as gradient clipping in mixed precision needs (optimizer.fused ignored)"
            log.info("optimizer: %s%s", describe(groups, lr), note if unfused else "")
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}

    def _optimizer_settings(self) -> dict[str, Any]:
        trainer = self._trainer
        clips = trainer is not None and bool(trainer.gradient_clip_val)
        mixed = clips and isinstance(trainer.precision_plugin, MixedPrecision)  # type: ignore[union-attr]
        return optimizer_settings(self.hparams["optimizer"], clips_in_mixed_precision=mixed)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume a checkpoint whose optimizer was built over other param groups (other ``finetune``
        settings, or a version of this code that grouped differently): Lightning would fail on it with a size
        mismatch, or restore moments into the wrong tensors. The saved groups take this run's kernel (``fused``),
        so torch restores the state in the layout that kernel steps (a fused step counter lives on the device)."""
        if self._trainer is None or self.trainer.state.fn != "fit" or not checkpoint.get("optimizer_states"):
            return
        groups = checkpoint["optimizer_states"][0].get("param_groups", [])
        fused = self._optimizer_settings().get("fused")
        for group in groups:
            if "fused" in group or fused:  # a group saved without the key would restore unfused
                group["fused"] = fused
        saved = [g.get("name") for g in groups]
        lr = optimizer_lr(self.hparams["optimizer"])
        built = [g["name"] for g in build_param_groups(self.model, finetune_plan(self._trainer), lr)]
        if saved != built:
            raise ConfigError(
                f"resume=: the checkpoint's optimizer has the param groups {saved}, this run builds {built}. "
                f"Resume with the finetune settings the checkpoint was written with (its run directory's "
                f"config.yaml), or start a new run."
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["transfer"] = {
            "class_names": self.class_names,
            "meta": self.model.meta.to_dict(),
            "preprocess": self.preprocess.to_dict() if self.preprocess else None,
            "code": code_version(),
        }

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, map_location: str | torch.device = "cpu", live: bool = False
    ) -> Classifier:
        """Rebuild a trained classifier from its checkpoint alone (no config, no weight download).

        The file is input like any other: it is read with ``weights_only`` (a checkpoint handed to predict or
        evaluate must not be able to run code), and its metadata is bounded
        (:mod:`transfer.core.checkpoint_meta`) before anything is built from it. The module is built from the
        checked hyper-parameters here rather than by ``load_from_checkpoint``, which would read the file a second
        time and act on any ``_instantiator`` entry it finds there.

        Args:
            path: a ``.ckpt`` written by a run.
            map_location: device for the tensors.
            live: the weights as trained (``current_model_state``) instead of their EMA, which is what a run with
                the EMA callback validates, tests and saves as ``state_dict``; a checkpoint without an EMA has only
                its live weights, and gives them either way.

        Returns:
            The module in eval mode, with ``preprocess`` restored, ``loaded_weights`` saying which weights it holds
            (``ema`` or ``live``) and ``trained_on_val`` whether its validation images trained too.

        Raises:
            ConfigError: the file is no readable transfer checkpoint, or a field is out of bounds.
        """
        ckpt = _read_checkpoint(path, map_location)
        hparams = check_hparams(ckpt.get("hyper_parameters"), path, REGISTRY)
        info = ckpt.get("transfer") or {}
        if not isinstance(info, dict):
            raise refuse(path, "transfer", "is not a record of class names and preprocessing")
        if info.get("class_names") is not None:
            check_class_names(info["class_names"], path, "transfer.class_names")
        restored = check_preprocess(info["preprocess"], path, "transfer.preprocess") if info.get("preprocess") else None
        hparams["model"] = {**hparams["model"], "pretrained": False, "weights": None}
        averaged = isinstance(ckpt.get("current_model_state"), dict)  # state_dict is the EMA then
        entry = "current_model_state" if live and averaged else "state_dict"
        try:
            module = cls(**hparams)
            module.load_state_dict(ckpt[entry])
        except (TypeError, ValueError, RuntimeError, KeyError) as err:  # arguments or tensors that do not fit
            raise ConfigError(
                f"{path}: the model its hyper_parameters describe cannot hold its {entry} ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:200]}). Pass a .ckpt from a run's checkpoints/ folder."
            ) from err
        if module.preprocess is None and restored is not None:  # a checkpoint from before hparams carried it
            module.preprocess = restored
        module.loaded_weights = "ema" if averaged and not live else "live"
        module.trained_on_val = trained_on_val(ckpt)
        return module.to(map_location).eval()


def _read_checkpoint(path: str | Path, map_location: str | torch.device) -> dict[str, Any]:
    """The checkpoint's contents, read with ``weights_only``; anything else is a :class:`ConfigError`."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        raise ConfigError(
            f"{path} is not a checkpoint written by transfer.run, is damaged, or holds pickled objects that "
            f"could run code ({type(err).__name__}: {' '.join(str(err).split())[:120]}). Pass a .ckpt from a "
            f"run's checkpoints/ folder."
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ConfigError(
            f"{path} is not a checkpoint written by transfer.run (no hyper_parameters/state_dict entry). Pass a "
            f".ckpt from a run's checkpoints/ folder."
        )
    return ckpt
