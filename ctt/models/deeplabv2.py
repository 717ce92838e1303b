"""DeepLab-v2 with the reference code's CTT head, on a dilated ResNet (output stride 8).

Head, on the 2048-d layer4 output: a 1x1 branch and four 3x3 branches dilated 6/12/18/24,
each conv (bias) -> 256 channels -> GroupNorm(32) -> ReLU; concatenated (1280 channels);
squeeze-excitation (reduction 16); 3x3 conv -> `feat_dim` -> GroupNorm(32) (no ReLU, as in
the reference's `Classifier_Module2.bottleneck`); Dropout2d; 1x1 classifier without bias.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ctt.models.resnet import InputNorm, ResNetBackbone, SegModel, classify, init_head

ASPP_RATES = (6, 12, 18, 24)


class SqueezeExcitation(nn.Module):
    """Channel gating: `x [B, C, h, w] * sigmoid(MLP(mean_hw(x)))[:, :, None, None]`."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


def _branch(in_ch: int, out_ch: int, kernel: int, dilation: int) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=pad, dilation=dilation, bias=True),
        nn.GroupNorm(32, out_ch), nn.ReLU(inplace=True))


class DeepLabV2Head(nn.Module):
    """`x [B, in_channels, h, w]` -> `(logits [B, C, h, w], feats [B, feat_dim, h, w])`."""

    def __init__(self, in_channels: int, num_classes: int, *, feat_dim: int = 256,
                 dropout: float = 0.1, rates: tuple[int, ...] = ASPP_RATES,
                 branch_channels: int = 256) -> None:
        super().__init__()
        if feat_dim % 32:
            raise ValueError(
                f"model.feat_dim must be a multiple of 32 (GroupNorm(32)), got {feat_dim}")
        self.branches = nn.ModuleList(
            [_branch(in_channels, branch_channels, 1, 1)]
            + [_branch(in_channels, branch_channels, 3, r) for r in rates])
        cat_ch = branch_channels * (len(rates) + 1)
        self.se = SqueezeExcitation(cat_ch)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(cat_ch, feat_dim, 3, padding=1, bias=True), nn.GroupNorm(32, feat_dim))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(feat_dim, num_classes, 1, bias=False)
        init_head(self, self.classifier)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([branch(x) for branch in self.branches], dim=1)  # [B, 1280, h, w]
        x = self.bottleneck(self.se(x))  # [B, feat_dim, h, w]
        return classify(x, self.dropout, self.classifier)


class DeepLabV2(SegModel):
    """ResNet-`depth` (dilated layer3/layer4, output stride 8) + `DeepLabV2Head`.

    forward(images [B, 3, H, W] in [0, 1]) -> (logits [B, C, ceil(H/8), ceil(W/8)],
    feats [B, feat_dim, same h, w], L2-normalised over channels).
    """

    def __init__(self, num_classes: int, *, depth: int = 101, resnet_style: str = "torchvision",
                 feat_dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.output_stride = 8
        self.input_norm = InputNorm(resnet_style)
        self.backbone = ResNetBackbone(depth, self.output_stride, resnet_style)
        self.head = DeepLabV2Head(self.backbone.out_channels, num_classes,
                                  feat_dim=feat_dim, dropout=dropout)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, high = self.backbone(self.input_norm(images))
        return self.head(high)
