"""Continual-learning methods, one file each. Importing fills the METHODS registry."""
from . import (  # noqa: F401  (registration)
    agem,
    bic,
    coda_prompt,
    dark_er,
    der,
    dualprompt,
    dytox,
    e2e,
    er,
    ewc,
    fdr,
    finetune,
    gem,
    gss,
    hal,
    icarl,
    joint,
    l2p,
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
    ucir,
    wa,
)
from .base import METHODS, Batch, Method, MethodOptions, ParamCount, Phase, register_method
from .losses import classification_loss

__all__ = ["METHODS", "Batch", "Method", "MethodOptions", "ParamCount", "Phase", "classification_loss",
           "register_method"]
