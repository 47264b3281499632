"""Continual-learning methods, one file each. Importing fills the METHODS registry."""
from . import der, dytox, finetune, joint, lpa, lvt, mask_rkr, multihead, piggyback, replay, rkr, single, ucir  # noqa: F401,E501  (registration)
from .base import METHODS, Batch, Method, MethodOptions, ParamCount, Phase, register_method
from .losses import classification_loss

__all__ = ["METHODS", "Batch", "Method", "MethodOptions", "ParamCount", "Phase", "classification_loss",
           "register_method"]
