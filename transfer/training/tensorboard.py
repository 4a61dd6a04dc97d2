"""TensorBoard beyond scalars: augmented inputs at the start, the confusion matrix at the end, and HParams."""

from __future__ import annotations

from typing import Any, cast

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.utils import make_grid

from transfer.data.batch import as_batch
from transfer.training.module import Classifier


def _writer(trainer: L.Trainer) -> Any | None:
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class TensorBoardExtras(L.Callback):
    """Logs what a scalar dashboard misses.

    * ``inputs/augmented``: the first training batch as the model sees it (un-normalised), to catch a wrong
      augmentation or normalisation before hours are spent.
    * ``test/confusion``: the test split's confusion matrix as a figure (torchmetrics'
      ``MulticlassConfusionMatrix``, counted on the device and summed over the ranks under DDP).
    """

    def __init__(self, max_images: int = 32) -> None:
        self.max_images = max_images
        self._logged_inputs = False
        self._confusion: MulticlassConfusionMatrix | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        writer, module = _writer(trainer), cast(Classifier, pl_module)
        batch = as_batch(batch)
        if self._logged_inputs or writer is None or module.preprocess is None or batch.features:
            return  # (cached features are not images)
        x = module.preprocess.denormalize(batch.x[: self.max_images].detach().float().cpu())
        writer.add_image("inputs/augmented", make_grid(x, nrow=8), trainer.global_step)
        self._logged_inputs = True

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A fresh count per test run, kept on the module's device: no per-batch copy to the host.
        self._confusion = MulticlassConfusionMatrix(len(cast(Classifier, pl_module).class_names)).to(pl_module.device)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._confusion is not None:  # test_step returns its predicted classes: no second forward pass
            self._confusion.update(outputs, as_batch(batch).y)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writer = _writer(trainer)
        if writer is None or self._confusion is None or self._confusion.update_count == 0:
            return
        matrix = self._confusion.compute().cpu().numpy()  # every rank takes part in the DDP sum
        self._confusion = None
        if not trainer.is_global_zero:
            return
        from transfer.core.plots import confusion_matrix_figure_object

        writer.add_figure(
            "test/confusion",
            confusion_matrix_figure_object(matrix, cast(Classifier, pl_module).class_names),
            trainer.global_step,
        )


def log_hparams(trainer: L.Trainer, params: dict[str, Any], metrics: dict[str, float]) -> None:
    """Hyperparameters with final metrics, for TensorBoard's HParams tab (sweeps become one sortable table)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, {f"hp/{k}": v for k, v in metrics.items() if v is not None})
            # The Trainer finalized its loggers when the test ended, so this entry reopened a writer whose
            # thread would flush it at some later moment: close it here, so the run's files are final when the
            # run returns (a caller that hashes them, or copies the folder, sees them whole).
            logger.finalize("success")
