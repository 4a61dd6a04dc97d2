"""Model factory and registry. Importing this package registers every architecture."""

from transfer.models import cnn_zoo, mobile_zoo, transformer_zoo  # noqa: F401  (registration side effects)
from transfer.models.core import (
    REGISTRY,
    Architecture,
    ModelMeta,
    Split,
    TransferModel,
    architecture,
    count_parameters,
    create_model,
    model_preprocess,
    register,
    resolve_adapt,
    resolve_preprocess,
)
from transfer.models.layers import backbone_layers
from transfer.models.pretrained import PretrainedCfg

__all__ = [
    "REGISTRY",
    "Architecture",
    "ModelMeta",
    "PretrainedCfg",
    "Split",
    "TransferModel",
    "architecture",
    "backbone_layers",
    "count_parameters",
    "create_model",
    "model_preprocess",
    "register",
    "resolve_adapt",
    "resolve_preprocess",
]
