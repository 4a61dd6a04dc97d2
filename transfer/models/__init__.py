"""Model factory and registry. Importing this package registers every architecture."""
from transfer.models import timm_zoo, torchvision_zoo  # noqa: F401  (registration side effects)
from transfer.models.core import (REGISTRY, Architecture, ModelMeta, TransferModel, count_parameters,
                                  create_model, register)

__all__ = ["REGISTRY", "Architecture", "ModelMeta", "TransferModel", "count_parameters", "create_model",
           "register"]
