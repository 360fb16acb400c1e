"""Model families behind one protocol (see ``base.Backbone``).

``BackboneConfig`` and ``FAMILY_NAMES`` need no torch; the families (``families()``, ``FAMILIES``,
``build_backbone``) load torch, transformers and peft on first use, so ``rkif --help`` starts without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from rkif.backbones.config import FAMILY_NAMES, BackboneConfig
from rkif.backbones.sources import family_from_name, resolve_model

if TYPE_CHECKING:
    from rkif.backbones.base import Backbone
    from rkif.backbones.causal import CausalBackbone
    from rkif.backbones.encoder import EncoderBackbone, minilm_path
    from rkif.backbones.seq2seq import Seq2SeqBackbone

# name -> module that defines it, imported on first access (PEP 562)
_LAZY = {"Backbone": "rkif.backbones.base", "CausalBackbone": "rkif.backbones.causal",
         "EncoderBackbone": "rkif.backbones.encoder", "minilm_path": "rkif.backbones.encoder",
         "Seq2SeqBackbone": "rkif.backbones.seq2seq"}


def __getattr__(name: str):
    if name == "FAMILIES":
        return families()
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def families() -> dict[str, type[Backbone]]:
    """``{family name: Backbone class}``, keyed by ``FAMILY_NAMES``."""
    from rkif.backbones.causal import CausalBackbone
    from rkif.backbones.encoder import EncoderBackbone
    from rkif.backbones.seq2seq import Seq2SeqBackbone

    return {"encoder": EncoderBackbone, "seq2seq": Seq2SeqBackbone, "causal": CausalBackbone}


def build_backbone(cfg: BackboneConfig, peft_config=None) -> Backbone:
    """Load the configured model family with its adapter (the paper's LoRA unless ``peft_config``)."""
    if cfg.family not in FAMILY_NAMES:
        raise ValueError(f"unknown --family {cfg.family!r}: choose from {sorted(FAMILY_NAMES)}")
    fixed = family_from_name(cfg.model)
    if fixed and cfg.family != fixed:
        raise ValueError(f"--model {cfg.model}: its family is {fixed}; use --family {fixed} (or auto)")
    if cfg.model != "minilm":
        resolve_model(cfg.model)        # a missing file or folder, a missing GGUF reader: named before loading
    return families()[cfg.family](cfg, peft_config=peft_config)


__all__ = ["Backbone", "BackboneConfig", "CausalBackbone", "EncoderBackbone", "FAMILIES", "FAMILY_NAMES",
           "Seq2SeqBackbone", "build_backbone", "families", "minilm_path"]
