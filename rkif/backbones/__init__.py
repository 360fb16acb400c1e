"""Model families behind one protocol (see ``base.Backbone``)."""

from rkif.backbones.base import Backbone, BackboneConfig
from rkif.backbones.causal import CausalBackbone
from rkif.backbones.encoder import EncoderBackbone, minilm_path
from rkif.backbones.seq2seq import Seq2SeqBackbone
from rkif.backbones.sources import family_from_name, resolve_model

FAMILIES: dict[str, type[Backbone]] = {
    "encoder": EncoderBackbone,
    "seq2seq": Seq2SeqBackbone,
    "causal": CausalBackbone,
}


def build_backbone(cfg: BackboneConfig, peft_config=None) -> Backbone:
    """Load the configured model family with its adapter (the paper's LoRA unless ``peft_config``)."""
    if cfg.family not in FAMILIES:
        raise ValueError(f"unknown --family {cfg.family!r}: choose from {sorted(FAMILIES)}")
    fixed = family_from_name(cfg.model)
    if fixed and cfg.family != fixed:
        raise ValueError(f"--model {cfg.model}: its family is {fixed}; use --family {fixed} (or auto)")
    if cfg.model != "minilm":
        resolve_model(cfg.model)        # a missing file or folder, a missing GGUF reader: named before loading
    return FAMILIES[cfg.family](cfg, peft_config=peft_config)


__all__ = ["Backbone", "BackboneConfig", "FAMILIES", "build_backbone", "minilm_path"]
