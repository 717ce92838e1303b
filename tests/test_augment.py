import pytest
import torch
import torchvision.transforms.v2.functional as TF

from ctt.augment import (
    Augmented,
    blur_kernel_size,
    blur_with_sigma,
    classmix_masks,
    color_jitter,
    color_permute,
    cutmix_masks,
    gaussian_blur,
    jitter_with_factors,
    mix_batch,
    permute_with_params,
    strong_augment,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_pseudo(b=4, h=16, w=16, c=6, seed=0, ignore_frac=0.1) -> torch.Tensor:
    g = gen(seed)
    pseudo = torch.randint(0, c, (b, h, w), generator=g)
    pseudo[torch.rand(b, h, w, generator=g) < ignore_frac] = 255
    return pseudo


# --- ClassMix -------------------------------------------------------------------------------


def test_classmix_pastes_exactly_half_the_classes():
    pseudo = random_pseudo()
    pseudo[1] = torch.where(pseudo[1] == 255, 255, pseudo[1] % 3)  # n = 3 -> 1 class
    pseudo[2, :, :] = 4  # n = 1 -> nothing
    pseudo[3, :8] = 255  # ignore honoured
    masks = classmix_masks(pseudo, gen(0))
    assert masks.shape == pseudo.shape and masks.dtype == torch.bool
    for i in range(pseudo.shape[0]):  # slow reference per image
        present = {int(c) for c in pseudo[i].unique() if c != 255}
        chosen = {int(c) for c in pseudo[i][masks[i]].unique()}
        assert chosen <= present
        assert len(chosen) == len(present) // 2
        union = torch.zeros_like(masks[i])
        for c in chosen:
            union |= pseudo[i] == c
        assert torch.equal(masks[i], union)
        assert not masks[i][pseudo[i] == 255].any()
    assert not masks[2].any()


def test_classmix_seeded_and_varies():
    pseudo = random_pseudo(b=2, seed=1)
    a = classmix_masks(pseudo, gen(7))
    assert torch.equal(a, classmix_masks(pseudo, gen(7)))
    assert torch.equal(a, classmix_masks(pseudo, gen(7), num_classes=6))
    chosen_sets = {
        tuple(pseudo[0][classmix_masks(pseudo, gen(s))[0]].unique().tolist()) for s in range(20)
    }
    assert len(chosen_sets) > 5


def test_classmix_uniform_over_classes():
    # 4 present classes, 2 chosen: every class should be picked about half the time.
    pseudo = torch.arange(4).repeat_interleave(4).view(1, 4, 4)
    counts = torch.zeros(4)
    n = 400
    for s in range(n):
        m = classmix_masks(pseudo, gen(s))[0]
        counts += torch.stack([m[pseudo[0] == c].all() for c in range(4)]).float()
    assert counts.sum() == 2 * n
    assert ((counts / n - 0.5).abs() < 0.1).all(), counts


def test_classmix_edge_cases_and_errors():
    assert not classmix_masks(torch.full((2, 4, 4), 255), gen(0)).any()
    with pytest.raises(ValueError, match="negative"):
        classmix_masks(torch.full((1, 4, 4), -1), gen(0))
    with pytest.raises(ValueError, match="num_classes"):
        classmix_masks(torch.full((1, 4, 4), 6), gen(0), num_classes=6)
    with pytest.raises(ValueError, match="integer class map"):
        classmix_masks(torch.zeros(1, 4, 4), gen(0))
    with pytest.raises(TypeError, match="Generator"):
        classmix_masks(torch.zeros(1, 4, 4, dtype=torch.long), 0)


# --- CutMix ---------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(32, 32), (24, 48), (7, 5)])
def test_cutmix_box_half_area(hw):
    h, w = hw
    masks = cutmix_masks(16, h, w, gen(3))
    assert masks.shape == (16, h, w)
    for m in masks:
        rows = m.any(1).nonzero().flatten()
        cols = m.any(0).nonzero().flatten()
        bh, bw = len(rows), len(cols)
        # one filled rectangle
        assert rows[-1] - rows[0] + 1 == bh and cols[-1] - cols[0] + 1 == bw
        assert m.sum() == bh * bw
        assert w // 2 + 1 <= bw <= w
        assert abs(bh * bw - h * w / 2) <= bw / 2 + 1e-9  # h = round(area / w)
    assert torch.equal(masks, cutmix_masks(16, h, w, gen(3)))
    assert not torch.equal(masks, cutmix_masks(16, h, w, gen(4)))


# --- mixing ---------------------------------------------------------------------------------


def encoded_images(b, h, w):
    """Each value encodes (image, channel, pixel) uniquely."""
    i = torch.arange(b).view(b, 1, 1, 1) * 10_000
    c = torch.arange(3).view(1, 3, 1, 1) * 1_000
    pix = torch.arange(h * w).view(1, 1, h, w)
    return (i + c + pix).double()


def test_mix_batch_follows_convention_and_labels_follow_images():
    b, h, w, c = 3, 6, 5, 4
    x = encoded_images(b, h, w)
    probs = torch.rand(b, c, h, w, generator=gen(0)).softmax(1)
    labels = torch.randint(0, c, (b, h, w), generator=gen(1))
    masks = torch.rand(b, h, w, generator=gen(2)) < 0.5
    xm, pm, lm = mix_batch(x, masks), mix_batch(probs, masks), mix_batch(labels, masks)
    for j in range(b):
        i = (j - 1) % b  # the image pasted onto j
        for y in range(h):
            for xx in range(w):
                src = i if masks[i, y, xx] else j
                assert torch.equal(xm[j, :, y, xx], x[src, :, y, xx])
                # decode the source image from the pixel value: probs/labels must agree
                decoded = int(xm[j, 0, y, xx]) // 10_000
                assert decoded == src
                assert torch.equal(pm[j, :, y, xx], probs[decoded, :, y, xx])
                assert lm[j, y, xx] == labels[decoded, y, xx]
    conf, yhat = pm.max(dim=1)  # the pseudo-labels of the mixed maps are the mixed ones
    assert torch.equal(yhat, mix_batch(probs.argmax(1), masks))
    torch.testing.assert_close(conf, mix_batch(probs.amax(1), masks))


def test_mix_batch_edge_cases():
    x = torch.rand(1, 3, 4, 4)
    assert torch.equal(mix_batch(x, torch.ones(1, 4, 4, dtype=torch.bool)), x)  # B = 1
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(mix_batch(x, torch.zeros(2, 4, 4, dtype=torch.bool)), x)
    assert torch.equal(mix_batch(x, torch.ones(2, 4, 4, dtype=torch.bool)), x.flip(0))
    with pytest.raises(ValueError, match="bool"):
        mix_batch(x, torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="matching masks"):
        mix_batch(x, torch.ones(2, 4, 5, dtype=torch.bool))


# --- colour jitter --------------------------------------------------------------------------


def test_jitter_matches_torchvision_per_sample():
    x = torch.rand(4, 3, 12, 10, generator=gen(0))
    x[0, :, :3] = 0.5  # grey pixels: hue undefined
    x[1, :, :2] = 1.0
    x[2, :, :2] = 0.0
    br = torch.tensor([0.75, 1.2, 1.0, 0.9])
    co = torch.tensor([1.25, 0.8, 1.1, 1.0])
    sa = torch.tensor([0.8, 1.25, 0.0, 1.1])
    hu = torch.tensor([0.25, -0.25, 0.1, -0.05])
    out = jitter_with_factors(x, br, co, sa, hu)
    for i in range(4):
        ref = TF.adjust_brightness(x[i], float(br[i]))
        ref = TF.adjust_contrast(ref, float(co[i]))
        ref = TF.adjust_saturation(ref, float(sa[i]))
        ref = TF.adjust_hue(ref, float(hu[i]))
        torch.testing.assert_close(out[i], ref, atol=2e-6, rtol=0)


def test_color_jitter_probability_range_and_seed():
    x = torch.rand(8, 3, 8, 8, generator=gen(0))
    assert torch.equal(color_jitter(x, gen(1), p=0.0), x)
    out = color_jitter(x, gen(1), p=1.0)
    assert out.min() >= 0 and out.max() <= 1
    assert all(not torch.allclose(out[i], x[i]) for i in range(8))
    assert torch.equal(out, color_jitter(x, gen(1), p=1.0))
    assert not torch.equal(out, color_jitter(x, gen(2), p=1.0))
    half = color_jitter(x, gen(5), p=0.5)
    changed = [not torch.equal(half[i], x[i]) for i in range(8)]
    assert 0 < sum(changed) < 8  # some selected, the rest bit-exact


def test_color_jitter_per_batch_matches_loop_reference():
    """per="batch": one coin for the whole batch (image 0's draw), factors still per image."""
    x = torch.rand(5, 3, 6, 6, generator=gen(0))
    outcomes = set()
    for seed in range(12):
        out = color_jitter(x, gen(seed), p=0.5, per="batch")
        u = torch.rand(5, 5, generator=gen(seed))  # the documented draw layout
        apply = bool(u[0, 0] < 0.5)
        fac = 0.75 + 0.5 * u[:, 1:4]
        hue = -0.25 + 0.5 * u[:, 4]
        for i in range(5):
            ref = (jitter_with_factors(x[i:i + 1], fac[i:i + 1, 0], fac[i:i + 1, 1],
                                       fac[i:i + 1, 2], hue[i:i + 1])[0] if apply else x[i])
            torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)
            assert torch.equal(out[i], x[i]) != apply  # all or none, never a mix
        outcomes.add(apply)
    assert outcomes == {True, False}
    # Same stream consumed by both units: the per-sample factors are the same numbers.
    g_s, g_b = gen(3), gen(3)
    color_jitter(x, g_s, per="sample"), color_jitter(x, g_b, per="batch")
    assert torch.equal(g_s.get_state(), g_b.get_state())
    with pytest.raises(ValueError, match="sample.*batch"):
        color_jitter(x, gen(0), per="image")


def test_gaussian_blur_per_batch_matches_loop_reference():
    """per="batch": one coin and one sigma for the whole batch (image 0's draws)."""
    x = torch.rand(4, 3, 20, 20, generator=gen(0), dtype=torch.float64)
    outcomes = set()
    for seed in range(12):
        out = gaussian_blur(x, gen(seed), p=0.5, per="batch")
        u = torch.rand(4, 2, generator=gen(seed), dtype=torch.float64)
        apply = bool(u[0, 0] < 0.5)
        sigma = 0.15 + 1.0 * u[0, 1]
        for i in range(4):
            ref = (blur_with_sigma(x[i:i + 1], sigma.view(1))[0].clamp(0, 1) if apply
                   else x[i])
            torch.testing.assert_close(out[i], ref, atol=1e-12, rtol=0)
        outcomes.add(apply)
    assert outcomes == {True, False}
    per_sample = gaussian_blur(x, gen(1), p=1.0, per="sample")  # differing sigmas per image
    per_batch = gaussian_blur(x, gen(1), p=1.0, per="batch")
    assert torch.equal(per_batch[0], per_sample[0]) and not torch.equal(per_batch, per_sample)


def test_strong_augment_jitter_blur_per_batch():
    x = torch.rand(4, 3, 16, 16, generator=gen(0))
    p = teacher_probs(seed=1)
    outcomes = set()
    for seed in range(16):
        aug = strong_augment(x, [p], mix="cutmix", generator=gen(seed), jitter_blur_per="batch")
        g = _after_cutmix(gen(seed), 4, 16, 16)
        mixed = mix_batch(x, aug.masks)
        expected = gaussian_blur(color_jitter(mixed, g, per="batch"), g, per="batch")
        assert torch.equal(aug.images, expected)
        outcomes.add(tuple(not torch.equal(aug.images[i], mixed[i]) for i in range(4)))
    assert outcomes <= {(True,) * 4, (False,) * 4}
    with pytest.raises(ValueError, match="sample.*batch"):
        strong_augment(x, [p], mix="cutmix", generator=gen(0), jitter_blur_per="pixel")


# --- blur -----------------------------------------------------------------------------------


def test_kernel_size():
    assert [blur_kernel_size(s) for s in (8, 32, 48, 64, 321, 512, 1024)] == [
        3, 3, 5, 7, 33, 51, 103,
    ]
    assert blur_kernel_size(1) == 1


def test_blur_matches_torchvision_per_sample():
    x = torch.rand(3, 3, 40, 24, generator=gen(0), dtype=torch.float64)
    sigma = torch.tensor([0.15, 0.6, 1.15], dtype=torch.float64)
    out = blur_with_sigma(x, sigma)
    ky, kx = blur_kernel_size(40), blur_kernel_size(24)
    for i in range(3):
        ref = TF.gaussian_blur(x[i], kernel_size=[kx, ky], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], ref, rtol=1e-10, atol=1e-10)


def test_blur_identity_cases_and_seed():
    x = torch.rand(4, 3, 32, 32, generator=gen(0))
    torch.testing.assert_close(gaussian_blur(x, gen(0), p=1.0, sigma=(1e-3, 1e-3)), x)
    assert torch.equal(gaussian_blur(x, gen(0), p=0.0), x)
    flat = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, gen(0), p=1.0), flat)
    out = gaussian_blur(x, gen(9), p=1.0)
    assert out.min() >= 0 and out.max() <= 1
    assert out.std() < x.std()  # blur smooths noise
    assert torch.equal(out, gaussian_blur(x, gen(9), p=1.0))
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(x, gen(0), sigma=(0.0, 1.0))


# --- channel permutation ----------------------------------------------------------------------


def test_permute_with_params_matches_per_pixel_loop():
    x = torch.rand(3, 3, 5, 4, generator=gen(0))
    order = torch.tensor([[2, 0, 1], [0, 1, 2], [1, 2, 0]])
    gain, offset = torch.tensor([0.8, 1.2, 1.0]), torch.tensor([0.05, -0.1, 0.0])
    grey = torch.tensor([False, True, False])
    noise = 0.02 * torch.randn(x.shape, generator=gen(1))
    out = permute_with_params(x, order, gain, offset, grey, noise)
    ref = torch.empty_like(x)
    for b in range(3):
        for i in range(5):
            for j in range(4):
                rgb = [float(x[b, order[b, c], i, j]) * float(gain[b]) + float(offset[b])
                       for c in range(3)]
                if grey[b]:
                    luma = 0.2989 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
                    rgb = [luma] * 3
                for c in range(3):
                    ref[b, c, i, j] = min(max(rgb[c] + float(noise[b, c, i, j]), 0.0), 1.0)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_color_permute_draws_every_permutation_and_is_seeded():
    # Distinct constant channels, no gain/offset/grey/noise: the output is the permutation.
    x = torch.tensor([0.1, 0.5, 0.9]).view(1, 3, 1, 1).expand(600, 3, 2, 2).contiguous()
    out = color_permute(x, gen(4), gain=(1.0, 1.0), offset=0.0, grey_p=0.0, noise_std=0.0)
    seen = {tuple(round(float(v), 1) for v in out[b, :, 0, 0]) for b in range(600)}
    assert seen == {(0.1, 0.5, 0.9), (0.1, 0.9, 0.5), (0.5, 0.1, 0.9), (0.5, 0.9, 0.1),
                    (0.9, 0.1, 0.5), (0.9, 0.5, 0.1)}
    full = color_permute(x, gen(4))
    assert torch.equal(full, color_permute(x, gen(4)))
    assert not torch.equal(full, color_permute(x, gen(5)))
    assert full.min() >= 0 and full.max() <= 1
    grey = color_permute(x, gen(4), grey_p=1.0, noise_std=0.0)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    with pytest.raises(ValueError, match="grey_p"):
        color_permute(x, gen(0), grey_p=1.5)


def test_strong_augment_permute_changes_images_only():
    x = torch.rand(4, 3, 16, 16, generator=gen(0))
    p = teacher_probs(seed=1)
    plain = strong_augment(x, [p], mix="cutmix", generator=gen(3), jitter_p=0.0, blur_p=0.0)
    perm = strong_augment(x, [p], mix="cutmix", generator=gen(3), color="permute")
    assert torch.equal(perm.masks, plain.masks) and torch.equal(perm.probs[0], plain.probs[0])
    expected = color_permute(mix_batch(x, plain.masks), _after_cutmix(gen(3), 4, 16, 16))
    assert torch.equal(perm.images, expected)
    with pytest.raises(ValueError, match="jitter.*permute"):
        strong_augment(x, [p], mix="cutmix", generator=gen(3), color="hsv")


def _after_cutmix(g: torch.Generator, b: int, h: int, w: int) -> torch.Generator:
    cutmix_masks(b, h, w, g)
    return g


# --- strong_augment -------------------------------------------------------------------------


def teacher_probs(b=4, c=5, h=16, w=16, seed=0):
    return (3 * torch.randn(b, c, h, w, generator=gen(seed))).softmax(1)


@pytest.mark.parametrize("mix", ["classmix", "cutmix", "none"])
def test_strong_augment_keeps_probs_aligned(mix):
    x = torch.rand(4, 3, 16, 16, generator=gen(0))
    p0, p1 = teacher_probs(seed=1), teacher_probs(seed=2)
    plain = strong_augment(x, [p0, p1], mix=mix, generator=gen(3), jitter_p=0.0, blur_p=0.0)
    assert isinstance(plain, Augmented)
    assert torch.equal(plain.images, mix_batch(x, plain.masks))
    assert torch.equal(plain.probs[0], mix_batch(p0, plain.masks))
    assert torch.equal(plain.probs[1], mix_batch(p1, plain.masks))
    if mix == "none":
        assert not plain.masks.any()
    else:
        assert plain.masks.any()
    if mix == "classmix":  # classes from the mean of the maps by default
        expected = classmix_masks((p0 + p1).argmax(1), gen(3), num_classes=5)
        assert torch.equal(plain.masks, expected)
        own = strong_augment(
            x, [p0, p1], mix=mix, class_probs=p1, generator=gen(3), jitter_p=0, blur_p=0
        )
        assert torch.equal(own.masks, classmix_masks(p1.argmax(1), gen(3), num_classes=5))
    # Jitter and blur change the images only; same draws for the masks.
    full = strong_augment(x, [p0, p1], mix=mix, generator=gen(3), jitter_p=1.0, blur_p=1.0)
    assert torch.equal(full.masks, plain.masks)
    assert torch.equal(full.probs[0], plain.probs[0])
    assert not torch.allclose(full.images, plain.images)
    assert full.images.min() >= 0 and full.images.max() <= 1
    again = strong_augment(x, [p0, p1], mix=mix, generator=gen(3), jitter_p=1.0, blur_p=1.0)
    assert torch.equal(again.images, full.images)


def test_strong_augment_errors():
    x = torch.rand(2, 3, 8, 8)
    p = teacher_probs(b=2, h=8, w=8)
    with pytest.raises(ValueError, match="classmix.*cutmix.*none"):
        strong_augment(x, [p], mix="mixup", generator=gen(0))
    with pytest.raises(ValueError, match=r"probs_list\[0\]"):
        strong_augment(x, [teacher_probs(b=2, h=4, w=4)], mix="cutmix", generator=gen(0))
    with pytest.raises(ValueError, match="class_probs"):
        strong_augment(x, [], mix="classmix", generator=gen(0))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        strong_augment(torch.rand(2, 1, 8, 8), [p], mix="none", generator=gen(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_and_gpu_draw_identically():
    x = torch.rand(4, 3, 32, 32, generator=gen(0))
    p = teacher_probs(h=32, w=32)
    for mix in ("classmix", "cutmix"):
        cpu = strong_augment(x, [p], mix=mix, generator=gen(5), jitter_p=1.0, blur_p=1.0)
        gpu = strong_augment(x.cuda(), [p.cuda()], mix=mix, generator=gen(5), jitter_p=1.0,
                             blur_p=1.0)
        assert torch.equal(cpu.masks, gpu.masks.cpu())
        torch.testing.assert_close(cpu.images, gpu.images.cpu(), atol=1e-5, rtol=0)
        assert torch.equal(cpu.probs[0], gpu.probs[0].cpu())
