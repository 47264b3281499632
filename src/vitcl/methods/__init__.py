"""Continual-learning methods, one file each. Importing fills the METHODS registry."""
from . import (  # noqa: F401  (registration)
    agem,
    bic,
    dark_er,
    der,
    dytox,
    e2e,
    ease,
    er,
    ewc,
    fdr,
    finetune,
    gem,
    gss,
    hal,
    icarl,
    joint,
    lpa,
    lvt,
    lwf,
    mask_rkr,
    multihead,
    piggyback,
    podnet,
    replay,
    rkr,
    single,
    slca,
    ucir,
    wa,
)
from .base import METHODS, Batch, Method, MethodOptions, ParamCount, Phase, register_method
from .losses import classification_loss

__all__ = ["METHODS", "Batch", "Method", "MethodOptions", "ParamCount", "Phase", "classification_loss",
           "register_method"]
