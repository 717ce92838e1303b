"""Batched strong augmentation for the unlabeled view (docs/method.md, step 2).

Every random number is drawn on the CPU from a caller-supplied ``torch.Generator`` and only
then moved to the data's device, so a CPU run and a GPU run with the same seed make the same
choices (same classes, boxes, jitter factors and blur sigmas).

Images are float ``[B, 3, H, W]`` in ``[0, 1]``. The mixing convention used throughout:

    ``out[(i + 1) % B] = where(masks[i], x[i], x[(i + 1) % B])``

i.e. ``masks[i]`` selects pixels of image ``i`` (the paste *source*) that are pasted onto image
``(i + 1) % B`` (the *target*). :func:`mix_batch` applies this to any tensor shaped
``[B, ..., H, W]`` (images, probability maps, labels, confidences), so every per-pixel tensor
mixed with the same masks stays aligned with the mixed image. Colour jitter and blur change
images only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

MIX_TYPES = ("classmix", "cutmix", "none")
COLOR_AUGS = ("jitter", "permute")
DRAW_UNITS = ("sample", "batch")

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale uses.
_LUMA = (0.2989, 0.587, 0.114)


class Augmented(NamedTuple):
    """Result of :func:`strong_augment`.

    images: ``[B, 3, H, W]`` mixed, jittered and blurred images.
    probs: list of ``[B, C, H, W]`` probability maps mixed with the same masks (not jittered).
    masks: ``[B, H, W]`` bool paste masks in the :func:`mix_batch` convention (source-indexed);
        all False for ``mix="none"``. ``mix_batch(t, masks)`` aligns any other per-pixel tensor.
    """

    images: Tensor
    probs: list[Tensor]
    masks: Tensor


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator must live on the CPU (got device {generator.device}); random numbers are "
            "drawn on the CPU and moved to the data so CPU and GPU runs draw identically"
        )


def _check_per(per: str) -> None:
    if per not in DRAW_UNITS:
        raise ValueError(f"unknown draw unit per={per!r}; choose one of {DRAW_UNITS}")


def _check_images(x: Tensor, name: str = "x") -> None:
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(
            f"{name} must be a float image batch [B, 3, H, W]; got dtype {x.dtype}, "
            f"shape {tuple(x.shape)}"
        )


def _check_random_images(x: Tensor, generator: torch.Generator, per: str) -> None:
    """The inputs of a random per-image (or per-batch) colour augmentation."""
    _check_generator(generator)
    _check_images(x)
    _check_per(per)


# ---------------------------------------------------------------------------------------------
# Masks and mixing
# ---------------------------------------------------------------------------------------------


def classmix_masks(
    pseudo: Tensor,
    generator: torch.Generator,
    ignore_index: int = 255,
    *,
    num_classes: int | None = None,
) -> Tensor:
    """ClassMix masks: for each image pick ``floor(n / 2)`` of its ``n`` present classes.

    Args:
        pseudo: ``[B, H, W]`` integer class map (usually the argmax of a teacher's
            probabilities); ``ignore_index`` pixels are never selected and not counted in ``n``.
        generator: CPU generator; ``B * K`` uniforms are drawn (``K`` = ``num_classes`` or,
            when not given, the largest class id present plus one).
        ignore_index: label value to skip.
        num_classes: number of classes; passing it makes the number of draws independent of
            the data.

    Returns:
        ``[B, H, W]`` bool, True on pixels of the chosen classes (empty when ``n <= 1``).
    """
    _check_generator(generator)
    if pseudo.dim() != 3 or pseudo.is_floating_point() or pseudo.dtype == torch.bool:
        raise ValueError(
            f"pseudo must be an integer class map [B, H, W]; got dtype {pseudo.dtype}, "
            f"shape {tuple(pseudo.shape)}"
        )
    b = pseudo.shape[0]
    valid = pseudo != ignore_index  # [B, H, W]
    labels = torch.where(valid, pseudo, torch.zeros_like(pseudo)).long()
    # One host sync to validate ids: cheap next to a forward pass, and a bad id would otherwise
    # index out of range inside the gather below.
    lo, hi = (int(v) for v in torch.aminmax(labels)) if labels.numel() else (0, -1)
    if lo < 0:
        raise ValueError(f"pseudo contains negative class id {lo} (ignore_index={ignore_index})")
    if num_classes is None:
        num_classes = hi + 1
    elif hi >= num_classes:
        raise ValueError(f"pseudo contains class id {hi} >= num_classes={num_classes}")
    k = max(num_classes, 1)

    present = torch.zeros(b, k, dtype=torch.bool, device=pseudo.device)
    present.scatter_(1, labels.flatten(1), valid.flatten(1))  # [B, K]
    n_chosen = present.sum(1, keepdim=True) // 2  # [B, 1]
    # A random permutation of the present classes: sort random keys, absent classes last.
    keys = torch.rand(b, k, generator=generator).to(pseudo.device)
    keys = torch.where(present, keys, torch.full_like(keys, 2.0))
    order = keys.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(k, device=pseudo.device).expand(b, k)
    )
    chosen = present & (rank < n_chosen)  # [B, K]
    return chosen.gather(1, labels.flatten(1)).view_as(pseudo) & valid


def cutmix_masks(
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor:
    """CutMix masks: one axis-aligned box of about half the image area per image.

    ``w ~ U{floor(W/2) + 1, ..., W}``, ``h = round(H * W / 2 / w)`` clipped to ``[1, H]``, and a
    uniformly random position with the box fully inside the image (the ClassMix recipe).

    Returns:
        ``[B, H, W]`` bool, True inside each image's box.
    """
    _check_generator(generator)
    if batch_size < 0 or height < 1 or width < 1:
        raise ValueError(f"bad cutmix size B={batch_size}, H={height}, W={width}")
    u = torch.rand(batch_size, 3, generator=generator, dtype=torch.float64)  # [B, 3]
    w_lo = min(width // 2 + 1, width)
    w = w_lo + (u[:, 0] * (width - w_lo + 1)).floor().long().clamp(max=width - w_lo)
    h = (height * width / 2 / w.double()).round().long().clamp(1, height)
    x0 = (u[:, 1] * (width - w + 1)).floor().long().clamp(max=width - w)
    y0 = (u[:, 2] * (height - h + 1)).floor().long().clamp(max=height - h)
    ys = torch.arange(height).view(1, height, 1)
    xs = torch.arange(width).view(1, 1, width)
    inside_y = (ys >= y0.view(-1, 1, 1)) & (ys < (y0 + h).view(-1, 1, 1))
    inside_x = (xs >= x0.view(-1, 1, 1)) & (xs < (x0 + w).view(-1, 1, 1))
    return (inside_y & inside_x).to(device)


def mix_batch(x: Tensor, masks: Tensor) -> Tensor:
    """Paste masked pixels of image ``i`` onto image ``(i + 1) % B``.

    ``out[(i + 1) % B] = where(masks[i], x[i], x[(i + 1) % B])``. The same call mixes images,
    probability maps, label maps or any other per-pixel tensor, so they stay aligned.

    Args:
        x: ``[B, ..., H, W]`` (e.g. ``[B, 3, H, W]``, ``[B, C, H, W]`` or ``[B, H, W]``).
        masks: ``[B, H, W]`` bool, source-indexed (``masks[i]`` lives in image ``i``'s frame).

    Returns:
        Tensor shaped like ``x``.
    """
    if masks.dim() != 3 or masks.dtype != torch.bool:
        raise ValueError(
            f"masks must be bool [B, H, W]; got dtype {masks.dtype}, shape {tuple(masks.shape)}"
        )
    if x.dim() < 3 or x.shape[0] != masks.shape[0] or x.shape[-2:] != masks.shape[-2:]:
        raise ValueError(
            f"x {tuple(x.shape)} must be [B, ..., H, W] matching masks {tuple(masks.shape)}"
        )
    src = x.roll(1, dims=0)  # src[j] = x[j - 1]
    m = masks.roll(1, dims=0).view(masks.shape[0], *([1] * (x.dim() - 3)), *masks.shape[1:])
    return torch.where(m.to(x.device), src, x)


# ---------------------------------------------------------------------------------------------
# Colour jitter
# ---------------------------------------------------------------------------------------------


def _grayscale(x: Tensor) -> Tensor:
    """``[B, 3, H, W]`` -> ``[B, 1, H, W]`` luma."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(a: Tensor, b: Tensor, ratio: Tensor) -> Tensor:
    return (ratio * a + (1.0 - ratio) * b).clamp(0.0, 1.0)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    grey = maxc == minc  # hue undefined; define 0 and avoid 0/0
    delta = maxc - minc
    s = delta / torch.where(grey, torch.ones_like(maxc), maxc)
    d = torch.where(grey, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~is_r & ~is_g
    h = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def _hsv_to_rgb(hsv: Tensor) -> Tensor:
    h, s, v = hsv.unbind(1)
    h6 = h * 6.0
    sector = h6.floor()
    f = h6 - sector
    sector = sector.long().remainder(6).unsqueeze(1)  # [B, 1, H, W]
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    r = torch.stack((v, q, p, p, t, v), dim=1).gather(1, sector)
    g = torch.stack((t, v, v, q, p, p), dim=1).gather(1, sector)
    b = torch.stack((p, p, t, v, v, q), dim=1).gather(1, sector)
    return torch.cat((r, g, b), dim=1)


def jitter_with_factors(
    x: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor, hue: Tensor
) -> Tensor:
    """Deterministic batched colour jitter with torchvision ``adjust_*`` semantics.

    Applied in the fixed order brightness, contrast, saturation, hue, each clamped to
    ``[0, 1]`` (torchvision's ``ColorJitter`` shuffles the order per call; a fixed order keeps
    the draws simple and is what the ablations need).

    Args:
        x: ``[B, 3, H, W]`` in ``[0, 1]``.
        brightness, contrast, saturation: ``[B]`` multiplicative factors (1 = unchanged).
        hue: ``[B]`` hue shift in turns, in ``[-0.5, 0.5]`` (0 = unchanged).

    Returns:
        ``[B, 3, H, W]`` in ``[0, 1]``.
    """
    _check_images(x)

    def col(f: Tensor) -> Tensor:
        return f.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)

    x = (x * col(brightness)).clamp(0.0, 1.0)
    x = _blend(x, _grayscale(x).mean(dim=(1, 2, 3), keepdim=True), col(contrast))
    x = _blend(x, _grayscale(x), col(saturation))
    hsv = _rgb_to_hsv(x)
    h = torch.remainder(hsv[:, :1] + col(hue), 1.0)
    return _hsv_to_rgb(torch.cat((h, hsv[:, 1:]), dim=1))


def color_jitter(
    x: Tensor, generator: torch.Generator, strength: float = 0.25, p: float = 0.8,
    per: str = "sample",
) -> Tensor:
    """Colour jitter with probability ``p``, per image (``per="sample"``) or for the whole
    batch at once (``per="batch"``, the ClassMix/CTT reference: one coin flip, but each image
    still gets its own factors, as kornia's batched ``ColorJitter`` draws them).

    Factors as torchvision ``ColorJitter(strength, strength, strength, strength)``:
    brightness, contrast and saturation ``~ U(1 - s, 1 + s)``, hue shift ``~ U(-s, s)``; fixed
    order (see :func:`jitter_with_factors`). Draws ``B * 5`` uniforms whatever ``p`` and
    ``per`` are (the batch coin is image 0's), so both units consume the same stream.

    Args:
        x: ``[B, 3, H, W]`` in ``[0, 1]``.

    Returns:
        ``[B, 3, H, W]`` in ``[0, 1]``; images not selected are returned bit-exact.
    """
    _check_random_images(x, generator, per)
    if not 0.0 <= strength <= 0.5:
        raise ValueError(f"jitter strength must be in [0, 0.5], got {strength}")
    u = torch.rand(x.shape[0], 5, generator=generator)  # [B, 5]
    apply = u[:, 0] < p if per == "sample" else (u[:1, 0] < p).expand(x.shape[0])
    fac = 1.0 - strength + 2.0 * strength * u[:, 1:4]
    hue = -strength + 2.0 * strength * u[:, 4]
    out = jitter_with_factors(x, fac[:, 0], fac[:, 1], fac[:, 2], hue)
    # The HSV round trip is not bit-exact, so unselected images keep their original pixels.
    return torch.where(apply.to(x.device).view(-1, 1, 1, 1), out, x)


# ---------------------------------------------------------------------------------------------
# Gaussian blur
# ---------------------------------------------------------------------------------------------


def blur_kernel_size(side: int) -> int:
    """Odd kernel size of about 10% of ``side`` (at least 3, reflect-padding safe).

    The ClassMix recipe: ``k = ceil(0.1 * side)``, minus one when even.
    """
    k = math.ceil(0.1 * side)
    k = k if k % 2 == 1 else k - 1
    k = max(k, 3)
    while k // 2 >= side and k > 1:  # reflect padding needs pad < side
        k -= 2
    return k


def _gauss_1d(sigma: Tensor, k: int) -> Tensor:
    """``[B]`` sigmas -> ``[B, k]`` normalised Gaussian taps."""
    xs = torch.arange(k, dtype=sigma.dtype, device=sigma.device) - (k - 1) / 2
    w = torch.exp(-0.5 * (xs / sigma.view(-1, 1)) ** 2)
    return w / w.sum(dim=1, keepdim=True)


def blur_with_sigma(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with a per-image sigma and reflect padding.

    Kernel sizes ``blur_kernel_size(H)`` vertically and ``blur_kernel_size(W)`` horizontally.

    Args:
        x: ``[B, C, H, W]``.
        sigma: ``[B]`` positive standard deviations in pixels.

    Returns:
        ``[B, C, H, W]``.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float [B, C, H, W] batch, got {x.dtype} {tuple(x.shape)}")
    b, c, h, w = x.shape
    sigma = sigma.to(device=x.device, dtype=x.dtype)
    ky, kx = blur_kernel_size(h), blur_kernel_size(w)
    # One depthwise conv over all B*C channels, each with its own image's kernel.
    y = x.reshape(1, b * c, h, w)
    wy = _gauss_1d(sigma, ky).repeat_interleave(c, dim=0).view(b * c, 1, ky, 1)
    wx = _gauss_1d(sigma, kx).repeat_interleave(c, dim=0).view(b * c, 1, 1, kx)
    y = F.conv2d(F.pad(y, (0, 0, ky // 2, ky // 2), mode="reflect"), wy, groups=b * c)
    y = F.conv2d(F.pad(y, (kx // 2, kx // 2, 0, 0), mode="reflect"), wx, groups=b * c)
    return y.view(b, c, h, w)


def gaussian_blur(
    x: Tensor,
    generator: torch.Generator,
    p: float = 0.5,
    sigma: tuple[float, float] = (0.15, 1.15),
    per: str = "sample",
) -> Tensor:
    """Gaussian blur with probability ``p``, ``sigma ~ U(sigma[0], sigma[1])``: each image its
    own coin flip and sigma (``per="sample"``), or one flip and one sigma for the whole batch
    (``per="batch"``, the ClassMix/CTT reference).

    Draws ``B * 2`` uniforms whatever ``p`` and ``per`` are (the batch uses image 0's).

    Args:
        x: ``[B, 3, H, W]`` in ``[0, 1]``.

    Returns:
        ``[B, 3, H, W]`` in ``[0, 1]``; images not selected are returned bit-exact.
    """
    _check_random_images(x, generator, per)
    lo, hi = sigma
    if not 0.0 < lo <= hi:
        raise ValueError(f"blur sigma range must satisfy 0 < low <= high, got {sigma}")
    u = torch.rand(x.shape[0], 2, generator=generator, dtype=torch.float64)  # [B, 2]
    if per == "batch":
        u = u[:1].expand_as(u)
    apply = u[:, 0] < p
    sig = lo + (hi - lo) * u[:, 1]
    out = blur_with_sigma(x, sig).clamp(0.0, 1.0)
    return torch.where(apply.to(x.device).view(-1, 1, 1, 1), out, x)


# ---------------------------------------------------------------------------------------------
# Channel permutation (label-safe only where colour carries no class information)
# ---------------------------------------------------------------------------------------------


def permute_with_params(
    x: Tensor, order: Tensor, gain: Tensor, offset: Tensor, grey: Tensor, noise: Tensor
) -> Tensor:
    """Deterministic colour scramble: channel permutation, gain/offset, greyscale, noise.

    Args:
        x: ``[B, 3, H, W]`` in ``[0, 1]``.
        order: ``[B, 3]`` long, a permutation of ``(0, 1, 2)`` per image (output channel ``c``
            is input channel ``order[b, c]``).
        gain, offset: ``[B]``; ``y = x * gain + offset``.
        grey: ``[B]`` bool; those images are replaced by their luma in all three channels.
        noise: ``[B, 3, H, W]`` added last.

    Returns:
        ``[B, 3, H, W]`` clamped to ``[0, 1]``.
    """
    _check_images(x)
    b = x.shape[0]
    order = order.to(x.device)
    y = torch.gather(x, 1, order.view(b, 3, 1, 1).expand_as(x))
    y = y * gain.to(x).view(-1, 1, 1, 1) + offset.to(x).view(-1, 1, 1, 1)
    y = torch.where(grey.to(x.device).view(-1, 1, 1, 1), _grayscale(y).expand_as(y), y)
    return (y + noise.to(x)).clamp(0.0, 1.0)


def color_permute(
    x: Tensor,
    generator: torch.Generator,
    *,
    gain: tuple[float, float] = (0.7, 1.3),
    offset: float = 0.1,
    grey_p: float = 0.2,
    noise_std: float = 0.03,
) -> Tensor:
    """Per-image random channel permutation, ``gain ~ U(gain)``, ``offset ~ U(-offset,
    offset)``, greyscale with probability ``grey_p``, then Gaussian noise of ``noise_std``.

    Far stronger than :func:`color_jitter`, and label-safe only where colour carries no class
    information: the synthetic task draws every object's colours from one shared palette, so
    a network that memorised colours from a few labels can be taught, through the
    pseudo-labels, that colour does not matter. On natural images (a red stop sign, green
    grass) keep ``jitter``. Draws ``B * 6`` uniforms, then ``B * 3 * H * W`` normals.

    Args:
        x: ``[B, 3, H, W]`` in ``[0, 1]``.

    Returns:
        ``[B, 3, H, W]`` in ``[0, 1]``.
    """
    _check_generator(generator)
    _check_images(x)
    lo, hi = gain
    if not 0.0 < lo <= hi or offset < 0 or not 0.0 <= grey_p <= 1.0 or noise_std < 0:
        raise ValueError(f"bad colour_permute parameters: gain={gain}, offset={offset}, "
                         f"grey_p={grey_p}, noise_std={noise_std}")
    b = x.shape[0]
    u = torch.rand(b, 6, generator=generator)  # [B, 6]: 3 sort keys, gain, offset, grey
    order = u[:, :3].argsort(dim=1)  # uniform over the 6 permutations
    noise = noise_std * torch.randn(x.shape, generator=generator)
    return permute_with_params(x, order, lo + (hi - lo) * u[:, 3],
                               offset * (2.0 * u[:, 4] - 1.0), u[:, 5] < grey_p, noise)


# ---------------------------------------------------------------------------------------------
# The whole strong view
# ---------------------------------------------------------------------------------------------


def strong_augment(
    x: Tensor,
    probs_list: list[Tensor],
    *,
    mix: str,
    generator: torch.Generator,
    class_probs: Tensor | None = None,
    jitter_p: float = 0.8,
    jitter_strength: float = 0.25,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.15, 1.15),
    color: str = "jitter",
    jitter_blur_per: str = "sample",
) -> Augmented:
    """Strong view of an unlabeled batch: mix, then colour jitter and blur (``color="jitter"``,
    the ClassMix/CTT recipe) or :func:`color_permute` (``color="permute"``), images only.

    Args:
        x: ``[B, 3, H, W]`` clean unlabeled images in ``[0, 1]``.
        probs_list: teacher probability maps ``[B, C, H, W]`` to mix with the same masks (one
            map per teacher whose pseudo-labels are used with this view).
        mix: ``"classmix"``, ``"cutmix"`` or ``"none"``.
        generator: CPU generator; draws happen in the order masks, jitter, blur (or masks,
            permutation).
        class_probs: ``[B, C, H, W]`` map whose argmax picks the ClassMix classes; defaults to
            the mean of ``probs_list`` (with shared augmentation that is the mean of both
            teachers; with a one-element list, that teacher's map).
        jitter_p, jitter_strength, blur_p, blur_sigma: see :func:`color_jitter` and
            :func:`gaussian_blur` (unused with ``color="permute"``).
        color: ``"jitter"`` or ``"permute"``.
        jitter_blur_per: ``"sample"`` or ``"batch"``: the unit of the jitter and blur coin
            flips (see :func:`color_jitter`, :func:`gaussian_blur`); the permutation view always
            draws per image.

    Returns:
        :class:`Augmented` ``(images, probs, masks)``; ``probs[j]`` and anything else passed
        through ``mix_batch(., masks)`` are aligned pixel for pixel with ``images``.
    """
    _check_generator(generator)
    _check_images(x)
    if mix not in MIX_TYPES:
        raise ValueError(f"unknown mix type {mix!r}; choose one of {MIX_TYPES}")
    if color not in COLOR_AUGS:
        raise ValueError(f"unknown colour augmentation {color!r}; choose one of {COLOR_AUGS}")
    _check_per(jitter_blur_per)
    b, _, h, w = x.shape
    probs_list = list(probs_list)
    for j, pr in enumerate(probs_list):
        if pr.dim() != 4 or pr.shape[0] != b or pr.shape[-2:] != (h, w):
            raise ValueError(
                f"probs_list[{j}] has shape {tuple(pr.shape)}; expected [B, C, H, W] with "
                f"B={b}, H={h}, W={w} (upsample teacher logits to the crop before softmax)"
            )

    if mix == "classmix":
        if class_probs is None:
            if not probs_list:
                raise ValueError("classmix needs class_probs or a non-empty probs_list")
            class_probs = torch.stack(probs_list).mean(dim=0)
        if class_probs.dim() != 4 or class_probs.shape[0] != b or class_probs.shape[-2:] != (h, w):
            raise ValueError(
                f"class_probs has shape {tuple(class_probs.shape)}; expected [B, C, H, W] "
                f"with B={b}, H={h}, W={w}"
            )
        masks = classmix_masks(
            class_probs.argmax(dim=1), generator, num_classes=class_probs.shape[1]
        )
    elif mix == "cutmix":
        masks = cutmix_masks(b, h, w, generator, device=x.device)
    else:
        masks = torch.zeros(b, h, w, dtype=torch.bool, device=x.device)

    if mix == "none":
        images, probs = x, probs_list
    else:
        images = mix_batch(x, masks)
        probs = [mix_batch(pr, masks) for pr in probs_list]
    if color == "permute":
        images = color_permute(images, generator)
    else:
        images = color_jitter(images, generator, strength=jitter_strength, p=jitter_p,
                              per=jitter_blur_per)
        images = gaussian_blur(images, generator, p=blur_p, sigma=blur_sigma,
                               per=jitter_blur_per)
    return Augmented(images, probs, masks)
