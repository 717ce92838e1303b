"""ctt.losses against slow float64 loop references (the contrastive one in
tests/contrast_reference.py, which the benchmarks time the losses against too)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from contrast_reference import loop_high_level, loop_low_level

import ctt.losses as losses
from ctt.losses import (
    high_level_contrast,
    low_level_contrast,
    masked_logsumexp,
    pseudo_label_ce,
    subsample_per_class,
    supervised_ce,
)

# ---------------------------------------------------------------------------- references


def ref_pixel_ce(logits, b, y, x, target):
    """-log softmax at one pixel, by hand."""
    row = [float(v) for v in logits[b, :, y, x]]
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return lse - row[target]


def unit(*shape, generator, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=dtype), dim=-1)


def contrast_case(seed=0, n=14, num_classes=5, size=4, dim=6, dtype=torch.float64):
    """Partially valid bank; class 2 has no entries (no positives); class 4 has no anchors."""
    g = torch.Generator().manual_seed(seed)
    anchors = unit(n, dim, generator=g, dtype=dtype).requires_grad_(True)
    classes = torch.randint(0, 4, (n,), generator=g)
    classes[:4] = torch.tensor([0, 1, 2, 3])
    bank = unit(num_classes, size, dim, generator=g, dtype=dtype).requires_grad_(True)
    valid = torch.rand(num_classes, size, generator=g) < 0.6
    valid[:, 0] = True
    valid[2] = False
    positives = unit(n, dim, generator=g, dtype=dtype)
    return anchors, classes, bank, valid, positives


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


# ---------------------------------------------------------------------------- supervised / PL


def test_supervised_ce_matches_loop_and_honours_ignore():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 3, 5), generator=g)
    labels[0, 1, :] = 255
    loss = supervised_ce(logits, labels)
    terms = [ref_pixel_ce(logits, b, y, x, int(labels[b, y, x]))
             for b in range(2) for y in range(3) for x in range(5) if labels[b, y, x] != 255]
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)


def test_supervised_ce_all_ignored_is_zero_with_graph():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = supervised_ce(logits, torch.full((1, 4, 4), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


def pl_case():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    pseudo = torch.randint(0, 3, (2, 4, 4), generator=g)
    pseudo[1, 0, :] = 255  # padding
    conf = torch.rand(2, 4, 4, generator=g, dtype=torch.float64)
    conf[0, 0, 0] = 0.5  # exactly tau_p: counts as confident (>=)
    conf[0, 0, 1] = 0.25
    return logits, pseudo, conf


def pixels(pseudo):
    b, h, w = pseudo.shape
    return [(i, y, x) for i in range(b) for y in range(h) for x in range(w)
            if pseudo[i, y, x] != 255]


def test_pseudo_label_ce_uniform_matches_loop_with_inclusive_threshold():
    logits, pseudo, conf = pl_case()
    loss, weight = pseudo_label_ce(logits, pseudo, conf, weighting="uniform", tau_p=0.5)
    px = pixels(pseudo)
    w = sum(1 for p in px if float(conf[p]) >= 0.5) / len(px)
    ce = sum(ref_pixel_ce(logits, *p, int(pseudo[p])) for p in px) / len(px)
    assert weight == pytest.approx(w)
    assert loss.item() == pytest.approx(w * ce, rel=1e-12)
    # the pixel at exactly tau_p is counted: nudging it below changes the weight by 1/|V|
    conf2 = conf.clone()
    conf2[0, 0, 0] = 0.4999
    _, weight2 = pseudo_label_ce(logits, pseudo, conf2, weighting="uniform", tau_p=0.5)
    assert weight - weight2 == pytest.approx(1 / len(px))


def test_pseudo_label_ce_power_matches_loop():
    logits, pseudo, conf = pl_case()
    loss, weight = pseudo_label_ce(logits, pseudo, conf, weighting="power", tau_p=0.5)
    px = pixels(pseudo)
    ref = sum(float(conf[p]) ** 6 * ref_pixel_ce(logits, *p, int(pseudo[p])) for p in px)
    assert loss.item() == pytest.approx(ref / len(px), rel=1e-12)
    assert weight == pytest.approx(sum(float(conf[p]) ** 6 for p in px) / len(px))


def test_pseudo_label_ce_mask_matches_loop():
    logits, pseudo, conf = pl_case()
    loss, weight = pseudo_label_ce(logits, pseudo, conf, weighting="mask", tau_p=0.5)
    px = pixels(pseudo)
    kept = [p for p in px if float(conf[p]) >= 0.5]
    ref = sum(ref_pixel_ce(logits, *p, int(pseudo[p])) for p in kept) / len(kept)
    assert loss.item() == pytest.approx(ref, rel=1e-12)
    assert weight == pytest.approx(len(kept) / len(px))


@pytest.mark.parametrize("weighting", ["uniform", "power", "mask"])
def test_pseudo_label_ce_nothing_kept_is_zero_not_nan(weighting):
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    pseudo = torch.zeros(1, 4, 4, dtype=torch.long)
    conf = torch.zeros(1, 4, 4)
    loss, weight = pseudo_label_ce(logits, pseudo, conf, weighting=weighting, tau_p=0.9)
    assert loss.item() == 0.0 and weight == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    loss, weight = pseudo_label_ce(logits, torch.full_like(pseudo, 255), conf + 1,
                                   weighting=weighting, tau_p=0.9)
    assert loss.item() == 0.0 and not math.isnan(weight)


def test_pseudo_label_ce_errors():
    logits, pseudo, conf = pl_case()
    with pytest.raises(ValueError, match="uniform.*power.*mask"):
        pseudo_label_ce(logits, pseudo, conf, weighting="threshold", tau_p=0.5)
    with pytest.raises(ValueError, match="conf"):
        pseudo_label_ce(logits, pseudo, conf[:, :2], weighting="mask", tau_p=0.5)


# ---------------------------------------------------------------------------- logsumexp


def test_masked_logsumexp_values_and_safe_empty_rows():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = masked_logsumexp(x, mask, dim=1)
    assert out[0].item() == pytest.approx(torch.logsumexp(x[0, mask[0]], 0).item())
    assert out[1].item() == float("-inf")
    assert out[2].item() == pytest.approx(torch.logsumexp(x[2], 0).item())
    (g,) = torch.autograd.grad(F.softplus(out - 1.0).sum(), x)
    assert torch.isfinite(g).all()
    assert (g[1] == 0).all() and (g[0, ~mask[0]] == 0).all()


# ---------------------------------------------------------------------------- high level


def test_high_level_matches_reference_values_and_grads():
    anchors, classes, bank, valid, _ = contrast_case()
    loss = high_level_contrast(anchors, classes, bank, valid, 0.1)
    ref = loop_high_level(anchors, classes, bank, valid, 0.1)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    ga, gb = grads(loss, anchors, bank)
    ra, rb = grads(ref, anchors, bank)
    torch.testing.assert_close(ga, ra, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gb, rb, rtol=1e-9, atol=1e-12)
    # anchors of class 2 (no positives) are dropped; invalid slots get no gradient
    assert (ga[classes == 2] == 0).all()
    assert (gb[~valid] == 0).all()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_high_level_matches_reference_other_seeds(seed):
    anchors, classes, bank, valid, _ = contrast_case(seed=seed, n=9, size=3, dim=4)
    loss = high_level_contrast(anchors, classes, bank, valid, 0.2)
    ref = loop_high_level(anchors, classes, bank, valid, 0.2)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)


def test_high_level_no_negatives_is_zero():
    anchors, classes, bank, valid, _ = contrast_case()
    only0 = torch.zeros_like(valid)
    only0[0, :2] = True  # positives (and empty slots) for class 0, no negatives anywhere
    loss = high_level_contrast(anchors, classes, bank, only0, 0.1)
    assert loss.item() == 0.0
    ga, gb = grads(loss, anchors, bank)
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()


@pytest.mark.parametrize("fn", ["high", "low"])
def test_empty_anchors_and_empty_bank_give_zero_not_nan(fn):
    anchors, classes, bank, valid, positives = contrast_case()

    def call(a, c, v, p):
        if fn == "high":
            return high_level_contrast(a, c, bank, v, 0.1)
        return low_level_contrast(a, p, c, bank, v, 0.5)

    empty = anchors[:0]
    loss = call(empty, classes[:0], valid, positives[:0])
    assert loss.item() == 0.0
    loss.backward()  # graph exists and backward works
    loss = call(anchors, classes, torch.zeros_like(valid), positives)
    assert loss.item() == 0.0
    (g,) = grads(loss, anchors)
    assert torch.isfinite(g).all()


def test_dtype_preserved_and_bfloat16_runs():
    a64, classes, b64, valid, p64 = contrast_case(n=20, dim=8)
    ref = high_level_contrast(a64, classes, b64, valid, 0.1).item()
    a32, b32 = a64.detach().float().requires_grad_(), b64.detach().float()
    out32 = high_level_contrast(a32, classes, b32, valid, 0.1)
    assert out32.dtype == torch.float32
    assert out32.item() == pytest.approx(ref, rel=1e-5)
    a16 = a64.detach().bfloat16().requires_grad_()
    out16 = high_level_contrast(a16, classes, b64.detach().bfloat16(), valid, 0.1)
    assert out16.dtype == torch.bfloat16
    assert out16.item() == pytest.approx(ref, rel=5e-2)
    out16.backward()
    assert a16.grad.dtype == torch.bfloat16 and torch.isfinite(a16.grad).all()
    low16 = low_level_contrast(a16, p64.bfloat16(), classes, b64.detach().bfloat16(), valid, 0.5)
    assert low16.dtype == torch.bfloat16 and torch.isfinite(low16)


# ---------------------------------------------------------------------------- low level


def test_low_level_matches_reference_values_and_grads():
    anchors, classes, bank, valid, positives = contrast_case()
    loss = low_level_contrast(anchors, positives, classes, bank, valid, 0.5)
    ref = loop_low_level(anchors, positives, classes, bank, valid, 0.5)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    ga, gb = grads(loss, anchors, bank)
    ra, rb = grads(ref, anchors, bank)
    torch.testing.assert_close(ga, ra, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gb, rb, rtol=1e-9, atol=1e-12)
    # class 2 has no bank entries but is NOT skipped: its anchors still get gradient
    assert (ga[classes == 2] != 0).any()


def test_low_level_concatenated_banks():
    anchors, classes, bank, valid, positives = contrast_case()
    bank2 = torch.cat([bank, bank.detach().flip(1)], dim=1)
    valid2 = torch.cat([valid, valid.flip(1)], dim=1)
    loss = low_level_contrast(anchors, positives, classes, bank2, valid2, 0.5)
    ref = loop_low_level(anchors, positives, classes, bank2, valid2, 0.5)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)


def test_contrast_shape_errors_name_the_culprit():
    anchors, classes, bank, valid, positives = contrast_case()
    with pytest.raises(ValueError, match="bank_valid"):
        high_level_contrast(anchors, classes, bank, valid.long(), 0.1)
    with pytest.raises(ValueError, match="feature dims"):
        high_level_contrast(anchors[:, :3], classes, bank, valid, 0.1)
    with pytest.raises(ValueError, match="positives"):
        low_level_contrast(anchors, positives[:3], classes, bank, valid, 0.5)
    with pytest.raises(ValueError, match="anchor_classes"):
        low_level_contrast(anchors, positives, classes[:3], bank, valid, 0.5)


# ---------------------------------------------------------------------------- sub-sampling


def test_subsample_per_class_caps_and_is_deterministic():
    classes = torch.tensor([0] * 7 + [1] * 2 + [3] * 5)[torch.randperm(14)]
    keep = subsample_per_class(classes, 3, torch.Generator().manual_seed(5))
    assert torch.equal(torch.bincount(classes[keep], minlength=4), torch.tensor([3, 2, 0, 3]))
    assert torch.equal(keep, torch.sort(keep).values) and keep.unique().numel() == keep.numel()
    again = subsample_per_class(classes, 3, torch.Generator().manual_seed(5))
    assert torch.equal(keep, again)
    draws = {tuple(subsample_per_class(classes, 3, torch.Generator().manual_seed(s)).tolist())
             for s in range(10)}
    assert len(draws) > 1  # it really is random across seeds
    assert subsample_per_class(classes[:0], 3).numel() == 0


@pytest.mark.parametrize("fn", ["high", "low"])
def test_max_anchors_equals_loss_on_the_kept_subset(fn):
    anchors, classes, bank, valid, positives = contrast_case(n=30)

    def call(idx=None, **kw):
        a, c, p = (anchors, classes, positives) if idx is None else (
            anchors[idx], classes[idx], positives[idx])
        if fn == "high":
            return high_level_contrast(a, c, bank, valid, 0.1, **kw)
        return low_level_contrast(a, p, c, bank, valid, 0.5, **kw)

    sub = call(max_anchors=2, generator=torch.Generator().manual_seed(7))
    keep = subsample_per_class(classes, 2, torch.Generator().manual_seed(7))
    assert torch.bincount(classes[keep]).max() <= 2
    assert sub.item() == call(keep).item()
    assert sub.item() != call().item()
    # cap >= every class count: identical to no sub-sampling; 0 / None: off
    full = call().item()
    assert call(max_anchors=30, generator=torch.Generator().manual_seed(1)).item() == full
    assert call(max_anchors=0).item() == full
    with pytest.raises(ValueError, match="max_anchors"):
        call(max_anchors=-1)


@pytest.mark.parametrize("fn", ["high", "low"])
def test_row_blocks_give_the_same_values_and_grads(fn, monkeypatch):
    anchors, classes, bank, valid, positives = contrast_case(n=23)

    def run():
        if fn == "high":
            loss = high_level_contrast(anchors, classes, bank, valid, 0.1)
        else:
            loss = low_level_contrast(anchors, positives, classes, bank, valid, 0.5)
        return (loss, *grads(loss, anchors, bank))

    whole = run()
    monkeypatch.setitem(losses.CHUNK_ELEMENTS, "cpu", 3 * bank.shape[0] * bank.shape[1])
    blocks = run()  # 8 blocks of <= 3 anchor rows
    for a, b in zip(whole, blocks):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
