"""The paper presets' real networks (DeepLab-v2 and DeepLab-v3+ on ResNet-101, random init)
through the full ``ctt`` step on CPU: two iterations in float32, then one under bf16 autocast,
with both contrastive terms switched on. Small crops and batches; the point is that the paper
setting runs end to end (shapes, dtypes, separate student forwards, the ClassMix view), not
what it learns.

Only one bf16 iteration, on a 17 px batch: on a CPU without native bf16 (no AVX512-BF16/AMX)
torch runs bf16 convolutions through its slow reference kernels (``slow_conv_dilated2d``),
about 10x the float32 time of a ResNet-101 step, and one iteration already runs every term
in bf16 with the banks filled and the contrast on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ctt.config import apply_variant, get_preset
from ctt.state import TrainState
from ctt.step import train_step

pytestmark = pytest.mark.slow

S, S_BF16, B = 33, 17, 2  # crop sides (odd, as the reference's 321); B labeled = unlabeled


def _batch(num_classes: int, seed: int, side: int = S) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y_l = torch.randint(0, num_classes, (B, side, side), generator=g)
    y_l[:, :4] = 255  # an ignored band
    return {"x_l": torch.rand(B, 3, side, side, generator=g), "y_l": y_l,
            "x_u": torch.rand(B, 3, side, side, generator=g)}


def _fill_banks(state: TrainState, num_classes: int) -> None:
    """Every class present in both banks and the contrast latched on, as after the banks
    filled up (the reference's readiness rule needs every class full)."""
    g = torch.Generator().manual_seed(7)
    for bank in state.banks:
        n = num_classes * bank.size
        bank.push(F.normalize(torch.randn(n, bank.dim, generator=g), dim=1),
                  torch.arange(num_classes).repeat_interleave(bank.size))
    state.contrast_on = True


@pytest.mark.parametrize("preset", ["voc-r101", "voc-r101-v3plus"])
def test_paper_network_runs_the_full_ctt_step(preset):
    cfg = apply_variant(get_preset(preset), "ctt").override({
        "data.crop_size": S, "data.crop_width": 0, "data.batch_size": B,
        "data.batch_size_u": B, "method.bank_size": 4, "optim.iters": 10,
        "run.device": "cpu"})
    m = cfg.method
    assert cfg.model.depth == 101 and m.student_forward == "separate" and m.mix == "classmix"
    assert m.jitter_blur_per == "batch" and m.strong_color == "jitter"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # nothing here is compared bit for bit
    try:
        state = TrainState(cfg)
        C = cfg.data.num_classes
        _fill_banks(state, C)
        for i, (amp, side) in enumerate([("none", S), ("none", S), ("bf16", S_BF16)]):
            out = train_step(state, _batch(C, i, side), cfg.override({"run.amp": amp}))
            _check_step(out, amp)
    finally:
        torch.set_num_threads(threads)
    assert state.step == 3
    for net in (*state.students, *state.teachers):
        assert all(torch.isfinite(p).all() for p in net.parameters())


def _check_step(out: dict[str, float], amp: str) -> None:
    for name in ("loss/total", "loss/sup", "loss/unsup", "loss/hc", "loss/lc"):
        assert math.isfinite(out[name]), (amp, name, out[name])
    assert out["loss/sup"] > 0 and out["loss/hc"] > 0 and out["loss/lc"] > 0, (amp, out)
    assert out["n/anchors_hc"] > 0 and out["n/anchors_lc"] > 0, (amp, out)
    assert out["contrast_on"] == 1.0
