"""Backbone helpers shared by the segmentation models.

- `InputNorm`: images arrive as float `[B, 3, H, W]` in `[0, 1]`; every model normalises
  inside itself, so data pipelines never need to know which backbone they feed.
- `SegModel`: the common interface (`backbone`, `head`, `output_stride`, parameter groups
  for the 10x head learning rate).
- `ResNetBackbone`: torchvision ResNet-50/101/152 without `fc`, dilated to output stride 8
  or 16, with the optional caffe-style stride placement of the DeepLab-v2 checkpoints.
- `load_pretrained`: loads a local weight file (torchvision ImageNet ResNet, the reference's
  DeepLab-v2 checkpoint layout, or our own full model) with a clear error on any mismatch.

Nothing here downloads anything: torchvision models are built with `weights=None`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn
import torchvision.models as tvm

from ctt.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Mean of the caffe-trained DeepLab-v2 weights, in BGR order, pixel scale 0-255, no std.
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)

RESNET_STYLES = ("torchvision", "caffe")
_RESNETS = {50: tvm.resnet50, 101: tvm.resnet101, 152: tvm.resnet152}
# replace_stride_with_dilation for layer2, layer3, layer4
_DILATION = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}


class InputNorm(nn.Module):
    """Normalise `[B, 3, H, W]` images in `[0, 1]` for a backbone.

    `"torchvision"`: ImageNet mean/std on RGB. `"caffe"`: BGR channel order, 0-255 scale minus
    the caffe mean, no std, which is what the caffe-converted DeepLab-v2 (COCO) weights saw
    in training. The buffers are not persistent, so checkpoints never depend on them.
    """

    def __init__(self, style: str = "torchvision") -> None:
        super().__init__()
        _check_style(style)
        if style == "caffe":
            mean = [m / 255.0 for m in CAFFE_MEAN_BGR]
            std = [1.0 / 255.0] * 3
        else:
            mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        self.bgr = style == "caffe"
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
        if self.bgr:
            x = x.flip(1)
        return (x - self.mean) / self.std


class SegModel(nn.Module):
    """Base of every model: `self.backbone` (lr x1) and everything else (the head, lr x10).

    Subclasses set `backbone`, `output_stride` and implement
    `forward(images [B, 3, H, W] in [0, 1]) -> (logits [B, C, h, w], feats [B, D, h, w])`.
    """

    backbone: nn.Module
    output_stride: int

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        in_backbone = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in in_backbone]


def classify(features: torch.Tensor, dropout: nn.Module, classifier: nn.Module):
    """The last step shared by all heads.

    `features [B, D, h, w]` -> dropout -> `classifier` (1x1 conv). Returns
    `(logits [B, C, h, w], feats [B, D, h, w])` where `feats` is the L2-normalised (over
    channels) version of exactly the tensor the classifier reads; the classifier itself reads
    the un-normalised tensor. In eval mode dropout is the identity, so the feats are the
    normalised penultimate feature; in train mode they carry the same dropout mask as the
    logits (as in the reference, which normalises after dropout).
    """
    x = dropout(features)
    return classifier(x), nn.functional.normalize(x, dim=1)


def init_head(head: nn.Module, classifier: nn.Conv2d) -> None:
    """The DeepLab heads' initialisation: every conv of `head` Kaiming-normal (fan_in, ReLU
    gain) with zero bias, then `classifier` from N(0, 0.01), as the reference draws it, for a
    near-uniform initial softmax."""
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(classifier.weight, std=0.01)


class ResNetBackbone(nn.Module):
    """conv1 ... layer4 of a torchvision ResNet (no avgpool/fc).

    State-dict keys are torchvision's (`conv1.weight`, `layer1.0.conv1.weight`,
    `layer1.0.downsample.1.running_mean`, ...) without `fc.*`.

    `style="caffe"` moves the stride of each downsampling bottleneck from its 3x3 conv to its
    first 1x1 conv, and gives the first block of a dilated stage the stage's dilation, as in
    the reference DeepLab-v2 ResNet whose COCO-pretrained weights use that layout. Output
    shapes are identical for both styles (the max-pool keeps torchvision's floor mode, unlike
    the reference's ceil mode, so two students of different styles produce aligned maps).

    forward(x [B, 3, H, W], already normalised) -> (low [B, 256, H/4, W/4],
    high [B, 2048, H/os, W/os]) (sizes rounded up).
    """

    def __init__(self, depth: int = 101, output_stride: int = 8, style: str = "torchvision"):
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"model.depth must be one of {sorted(_RESNETS)}, got {depth!r}")
        if output_stride not in _DILATION:
            raise ValueError(
                f"output_stride must be one of {sorted(_DILATION)}, got {output_stride}")
        _check_style(style)
        net = _RESNETS[depth](weights=None, replace_stride_with_dilation=_DILATION[output_stride])
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4)
        if style == "caffe":
            for layer in (self.layer2, self.layer3, self.layer4):
                _to_caffe_block(layer)
        self.depth, self.style, self.output_stride = depth, style, output_stride
        self.low_channels, self.out_channels = 256, 2048

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        high = self.layer4(self.layer3(self.layer2(low)))
        return low, high


def _to_caffe_block(layer: nn.Sequential) -> None:
    first = layer[0]
    if first.conv2.stride == (2, 2):
        first.conv1.stride, first.conv2.stride = (2, 2), (1, 1)
    if len(layer) > 1 and first.conv2.dilation != layer[1].conv2.dilation:
        first.conv2.dilation = first.conv2.padding = layer[1].conv2.dilation


def _check_style(style: str) -> None:
    if style not in RESNET_STYLES:
        raise ValueError(f"model.resnet_style must be one of {RESNET_STYLES}, got {style!r}")


# ---------------------------------------------------------------------------------------------
# Pretrained weights from local files

class WeightsError(UserError, ValueError):
    """A pretrained weight file is unreadable or does not fit the configured model."""


class MissingWeightsError(UserError, FileNotFoundError):
    """A pretrained weight file does not exist."""


# Wrappers in which checkpoints commonly nest their state dict.
_NESTED_KEYS = ("state_dict", "model_state", "model", "net")
# Prefixes added by DataParallel and by the AdvSemiSeg/ClassMix `Scale` wrapper.
_PREFIXES = ("module.", "Scale.")
# Heads of foreign checkpoints that never map onto ours: torchvision's fc, the reference's
# DeepLab-v2 classifier (`layer5.conv2d_list.N.*`, `layer5.bottleneck...`).
_DROPPED_PREFIXES = ("fc.", "layer5.")


def load_pretrained(model: nn.Module, path: str | os.PathLike, *,
                    strict_backbone: bool = True) -> dict:
    """Load weights from the local file `path` into `model` (in place).

    Accepted layouts (detected from the keys, after stripping `module.` / `Scale.` prefixes
    and unwrapping `{"state_dict": ...}`-style nesting):

    - our own full-model state dict (keys such as `backbone.conv1.weight`, `head.*`): loaded
      whole; every key and shape must match (running counters `num_batches_tracked` may be
      absent).
    - a backbone state dict: torchvision ImageNet ResNet (`conv1.weight`, `bn1.*`,
      `layer1.0.conv1.weight`, ...; `fc.*` ignored) or the reference DeepLab-v2 checkpoint
      (same names, `layer5.*` classifier dropped), loaded into `model.backbone`; the head keeps
      its initialisation. With `strict_backbone` every backbone key must be present with the
      right shape and no extra keys may remain (an extra `layer3.22.*` means a ResNet-101 file
      for a ResNet-50 model); otherwise only matching keys are loaded and the rest reported.

    The caffe-converted DeepLab-v2 checkpoint (recognised by a `Scale.` prefix or `layer5.*`
    keys) was trained with the stride in each block's 1x1 conv and BGR 0-255 mean-subtracted
    input; its names match torchvision's, so a `torchvision`-style model would take it
    silently with the wrong strides and normalisation. That is an error naming the setting
    (`model.resnet_style=caffe`). The opposite, torchvision ImageNet weights in a caffe-style
    model, loads: the reference initialises its second student exactly so.

    Returns a report `{"path", "format": "full"|"backbone", "layout": "caffe"|"other",
    "loaded": int, "dropped", "missing", "unexpected", "mismatched"}` (lists of key names).
    Raises `MissingWeightsError` (a `FileNotFoundError`) or `WeightsError` (a `ValueError`),
    one line naming the file, a few offending keys and what to set.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingWeightsError(
            f"pretrained weights file not found: {path!r} (set model.pretrained / "
            "model.pretrained_peer to an existing local file, or to 'none' for random init)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors all mean "unusable file"
        raise WeightsError(f"cannot read pretrained weights {path!r}: "
                           f"{' '.join(str(err).split())}") from err
    state, caffe_key = _unwrap_state_dict(obj, path)

    model_keys = set(model.state_dict())
    if len(state.keys() & model_keys) * 2 > len(state):
        target, fmt, dropped = model, "full", []
    else:
        target, fmt = model.backbone, "backbone"
        dropped = [k for k in state if k.startswith(_DROPPED_PREFIXES)]
        state = {k: v for k, v in state.items() if not k.startswith(_DROPPED_PREFIXES)}
    strict = strict_backbone or fmt == "full"
    backbone = getattr(model, "backbone", None)
    if (caffe_key is not None and fmt == "backbone" and isinstance(backbone, ResNetBackbone)
            and backbone.style != "caffe"):
        raise WeightsError(
            f"pretrained weights {path!r} are a caffe-converted DeepLab-v2 checkpoint (key "
            f"{caffe_key!r}): its ResNet has the stride in the 1x1 convs and expects BGR 0-255 "
            f"mean-subtracted input, but the model is {_describe(model)}; set "
            "model.resnet_style=caffe")

    own = target.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state if k in own and state[k].shape != own[k].shape]
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    problems = [(name, keys) for name, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                if keys and strict]
    if not usable:  # even a lenient load must load something, or the file is the wrong one
        problems = problems or [("no matching key", sorted(state)[:5])]
    if problems:
        details = "; ".join(f"{name} ({len(keys)}): {', '.join(keys[:5])}"
                            + (" ..." if len(keys) > 5 else "") for name, keys in problems)
        raise WeightsError(
            f"pretrained weights {path!r} do not fit the model as a {fmt} state dict "
            f"(model: {type(model).__name__}, {_describe(model)}): {details}")

    target.load_state_dict({**own, **usable}, strict=True)
    return {"path": path, "format": fmt, "layout": "other" if caffe_key is None else "caffe",
            "loaded": len(usable), "dropped": dropped,
            "missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def _unwrap_state_dict(obj: object, path: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of ``obj`` with wrapper prefixes stripped, and the first key (as stored)
    that marks the caffe DeepLab-v2 layout, or None."""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"pretrained weights {path!r} hold no state dict (got {type(obj).__name__})")
    # Only the caffe-converted DeepLab-v2 checkpoints (AdvSemiSeg/ClassMix/CTT) have the
    # `Scale.` wrapper or the `layer5` classifier; their ResNet names match torchvision's, so
    # these keys are the only sign that the weights need model.resnet_style=caffe.
    state, caffe_key = {}, None
    for stored, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. a stored epoch counter beside the tensors
        key = stored
        while key.startswith(_PREFIXES):
            if key.startswith("Scale.") and caffe_key is None:
                caffe_key = stored
            key = key.split(".", 1)[1]
        if caffe_key is None and key.startswith("layer5."):
            caffe_key = stored
        state[key] = value
    if not state:
        raise WeightsError(f"pretrained weights {path!r} contain no tensors")
    return state, caffe_key


def _describe(model: nn.Module) -> str:
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, ResNetBackbone):
        return f"ResNet-{backbone.depth}, {backbone.style} style"
    return f"backbone {type(backbone).__name__}"
