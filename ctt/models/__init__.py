"""Segmentation models: a plain dict registry and `build_model(cfg, student)`.

Every model maps images `[B, 3, H, W]` in `[0, 1]` (normalised inside) to
`(logits [B, C, h, w], feats [B, feat_dim, h, w])`, feats = the L2-normalised penultimate head
feature that the 1x1 classifier reads, and exposes `backbone_parameters()`,
`head_parameters()` (disjoint, together all parameters) and `output_stride` (H / h).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from ctt.models.deeplabv2 import DeepLabV2
from ctt.models.deeplabv3plus import DeepLabV3Plus
from ctt.models.resnet import MissingWeightsError, SegModel, WeightsError, load_pretrained
from ctt.models.tiny import TinySegNet

__all__ = ["MODELS", "DeepLabV2", "DeepLabV3Plus", "MissingWeightsError", "SegModel",
           "TinySegNet", "WeightsError", "build_model", "load_pretrained"]


def _tiny(m: Any, num_classes: int) -> nn.Module:
    return TinySegNet(num_classes, width=m.width, feat_dim=m.feat_dim, dropout=m.dropout,
                      fuse=m.fuse)


def _deeplabv2(m: Any, num_classes: int) -> nn.Module:
    return DeepLabV2(num_classes, depth=m.depth, resnet_style=m.resnet_style,
                     feat_dim=m.feat_dim, dropout=m.dropout)


def _deeplabv3plus(m: Any, num_classes: int) -> nn.Module:
    # model.output_stride is optional in the config; the reference DeepLab-v3+ uses 16.
    return DeepLabV3Plus(num_classes, depth=m.depth, resnet_style=m.resnet_style,
                         feat_dim=m.feat_dim, dropout=m.dropout,
                         output_stride=getattr(m, "output_stride", 16))


# arch name -> builder(cfg.model, num_classes)
MODELS: dict[str, Callable[[Any, int], nn.Module]] = {
    "tiny": _tiny,
    "deeplabv2": _deeplabv2,
    "deeplabv3plus": _deeplabv3plus,
}


def build_model(cfg: Any, student: int = 0) -> nn.Module:
    """Build `cfg.model.arch` for `cfg.data.num_classes` classes.

    Weights: random (the caller seeds the RNG beforehand, a different seed per student), then,
    unless the path is "none", `cfg.model.pretrained` (student 0) or
    `cfg.model.pretrained_peer` (student 1) is loaded with `load_pretrained` (a backbone-only
    file leaves the head random). A file that needs another `model.resnet_style` (the caffe
    DeepLab-v2 checkpoint in a torchvision-style model) or does not fit raises a
    `WeightsError` naming the file and the setting to change.
    """
    m = cfg.model
    if m.arch not in MODELS:
        raise ValueError(f"unknown model.arch {m.arch!r}; valid: {', '.join(sorted(MODELS))}")
    if student not in (0, 1):
        raise ValueError(f"student must be 0 or 1, got {student!r}")
    model = MODELS[m.arch](m, cfg.data.num_classes)
    path = m.pretrained if student == 0 else m.pretrained_peer
    if path and str(path).lower() != "none":
        load_pretrained(model, path)
    return model
