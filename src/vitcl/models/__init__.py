"""Backbones, attention variants, heads and parameter surgery. Importing fills the model registry."""
from . import cct, coat, convit, cvt, levit, lpsa, lvt, resnet, swin, timm_backbone, vit  # noqa: F401  (registration)
from .heads import GrowingHead, TaskHead
from .registry import MODELS, Backbone, create_backbone, register_model

__all__ = ["MODELS", "Backbone", "GrowingHead", "TaskHead", "create_backbone", "register_model"]
