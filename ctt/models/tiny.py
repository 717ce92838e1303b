"""A small encoder-decoder for CPU runs of the whole method (well under 1M parameters).

Encoder (`backbone`, base width w): 3x3 stride-2 convs to 1/2 (w), 1/4 (2w, kept as skip) and
1/8 (4w), then a dilated 3x3 conv for context; all conv+BN+ReLU.
Decoder (`head`): the 1/8 map upsampled to the skip's size (bilinear, align_corners=True),
concatenated with the skip (6w), the `fuse` conv -> `feat_dim` + BN (no ReLU, like the DeepLab-v2
head's last conv, so the features used for contrast are signed), Dropout2d, 1x1 classifier
without bias. Logits and feats are at 1/4 resolution: h = ceil(H/4), w = ceil(W/4).

`fuse` is `3x3` (tiny-v1) or `1x1`. At 1/4 resolution on 6w input channels the 3x3 fuse holds
56 % of the net's multiply-adds (w=24, feat_dim=64, 48 px); a 1x1 fuse has 9x fewer there, and
the skip's two 3x3 convs and the dilated 1/8 branch still give each output pixel its context.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctt.models.resnet import InputNorm, SegModel, classify

FUSE_KERNELS = {"3x3": 3, "1x1": 1}  # model.fuse -> kernel size of the decoder's fuse conv


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation,
                  bias=False),
        nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class TinyEncoder(nn.Module):
    """`x [B, 3, H, W]` (normalised) -> `(skip [B, 2w, H/4, W/4], deep [B, 4w, H/8, W/8])`."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = _conv_bn_relu(3, w, stride=2)
        self.stage2 = nn.Sequential(_conv_bn_relu(w, 2 * w, stride=2), _conv_bn_relu(2 * w, 2 * w))
        self.stage3 = nn.Sequential(_conv_bn_relu(2 * w, 4 * w, stride=2),
                                    _conv_bn_relu(4 * w, 4 * w, dilation=2))
        self.skip_channels, self.out_channels = 2 * w, 4 * w

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.stage2(self.stem(x))
        return skip, self.stage3(skip)


class TinyDecoder(nn.Module):
    """`(skip, deep)` -> `(logits [B, C, h4, w4], feats [B, feat_dim, h4, w4])`."""

    def __init__(self, skip_ch: int, deep_ch: int, num_classes: int, *, feat_dim: int = 256,
                 dropout: float = 0.1, fuse: str = "3x3") -> None:
        super().__init__()
        if fuse not in FUSE_KERNELS:
            raise ValueError(f"model.fuse must be one of {', '.join(FUSE_KERNELS)}, got {fuse!r}")
        k = FUSE_KERNELS[fuse]
        self.fuse = nn.Sequential(
            nn.Conv2d(skip_ch + deep_ch, feat_dim, k, padding=k // 2, bias=False),
            nn.BatchNorm2d(feat_dim))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(feat_dim, num_classes, 1, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.01)

    def forward(self, skip: torch.Tensor, deep: torch.Tensor):
        deep = F.interpolate(deep, size=skip.shape[2:], mode="bilinear", align_corners=True)
        x = self.fuse(torch.cat([deep, skip], dim=1))  # [B, feat_dim, h4, w4]
        return classify(x, self.dropout, self.classifier)


class TinySegNet(SegModel):
    """forward(images [B, 3, H, W] in [0, 1]) -> (logits [B, C, ceil(H/4), ceil(W/4)],
    feats [B, feat_dim, same], L2-normalised over channels)."""

    def __init__(self, num_classes: int, *, width: int = 16, feat_dim: int = 256,
                 dropout: float = 0.1, fuse: str = "3x3") -> None:
        super().__init__()
        if width < 1 or feat_dim < 1:
            raise ValueError(
                f"model.width and model.feat_dim must be positive, got {width}, {feat_dim}")
        self.output_stride = 4
        self.input_norm = InputNorm("torchvision")
        self.backbone = TinyEncoder(width)
        self.head = TinyDecoder(self.backbone.skip_channels, self.backbone.out_channels,
                                num_classes, feat_dim=feat_dim, dropout=dropout, fuse=fuse)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(*self.backbone(self.input_norm(images)))
