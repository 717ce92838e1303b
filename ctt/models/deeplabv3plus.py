"""DeepLab-v3+ on a dilated ResNet: ASPP + low-level decoder, final output stride 4.

ASPP on layer4 (2048-d): a 1x1 branch, three 3x3 branches (rates 6/12/18 at output stride 16,
12/24/36 at 8) and image pooling, each to 256 channels; concatenated and projected to 256.
Decoder: layer1 (256-d, stride 4) -> 1x1 conv to 48; ASPP output upsampled (bilinear,
align_corners=True) and concatenated (304); two 3x3 conv+BN+ReLU to 256 (`feat_dim`);
dropout; 1x1 classifier without bias. feats = that decoder output, L2-normalised.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ctt.models.resnet import InputNorm, ResNetBackbone, SegModel, classify, init_head

ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """`x [B, in_ch, h, w]` -> `[B, out_ch, h, w]`."""

    def __init__(self, in_ch: int, rates: tuple[int, ...], out_ch: int = 256) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_ch, out_ch, 1)] + [_conv_bn_relu(in_ch, out_ch, 3, r) for r in rates])
        # No BatchNorm on the pooled 1x1 map: with batch size 1 it has a single value per
        # channel, which BatchNorm rejects in training mode.
        self.pool = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=True), nn.ReLU(inplace=True))
        self.project = _conv_bn_relu(out_ch * (len(rates) + 2), out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3PlusHead(nn.Module):
    """`(low [B, 256, h4, w4], high [B, 2048, h, w])` -> `(logits, feats)` at `h4, w4`."""

    def __init__(self, low_ch: int, high_ch: int, num_classes: int, *, output_stride: int = 16,
                 feat_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.aspp = ASPP(high_ch, ASPP_RATES[output_stride])
        self.reduce = _conv_bn_relu(low_ch, 48, 1)
        self.fuse = nn.Sequential(_conv_bn_relu(256 + 48, 256, 3), _conv_bn_relu(256, feat_dim, 3))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(feat_dim, num_classes, 1, bias=False)
        init_head(self, self.classifier)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.interpolate(self.aspp(high), size=low.shape[2:], mode="bilinear", align_corners=True)
        x = self.fuse(torch.cat([x, self.reduce(low)], dim=1))  # [B, feat_dim, h4, w4]
        return classify(x, self.dropout, self.classifier)


class DeepLabV3Plus(SegModel):
    """ResNet-`depth` (output stride 8 or 16) + ASPP + decoder.

    forward(images [B, 3, H, W] in [0, 1]) -> (logits [B, C, h, w], feats [B, feat_dim, h, w])
    at the layer1 size h = ceil(H/4), w = ceil(W/4). The `output_stride` argument is the
    backbone's (8 or 16); the outputs are always at stride 4, which is what the
    `output_stride` attribute reports.
    """

    def __init__(self, num_classes: int, *, depth: int = 101, resnet_style: str = "torchvision",
                 feat_dim: int = 256, dropout: float = 0.1, output_stride: int = 16) -> None:
        super().__init__()
        if output_stride not in ASPP_RATES:
            raise ValueError(f"DeepLab-v3+ output_stride must be 8 or 16, got {output_stride}")
        self.input_norm = InputNorm(resnet_style)
        self.backbone = ResNetBackbone(depth, output_stride, resnet_style)
        self.head = DeepLabV3PlusHead(self.backbone.low_channels, self.backbone.out_channels,
                                      num_classes, output_stride=output_stride,
                                      feat_dim=feat_dim, dropout=dropout)
        self.output_stride = 4

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self.backbone(self.input_norm(images))
        return self.head(low, high)
