"""Paired transforms: alignment checked against float64 reference loops, padding, determinism."""

import math

import pytest
import torch

from ctt.data.transforms import (
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    eval_collate,
    item_generator,
    pad_collate,
    resize_pair,
    train_transform,
)

H, W = 12, 16  # H * W = 192 < 255, so a label can encode its own source pixel


def coordinate_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Image channels (x, y, 1) and label x + W*y: every pixel says where it came from."""
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    image = torch.stack([x.float(), y.float(), torch.ones(H, W)])  # [3, H, W]
    return image, (x + W * y).long()  # [H, W]


def ref_nearest_src(out_len: int, in_len: int) -> list[int]:
    """Pixel-centre nearest neighbour, the obvious way."""
    return [min(math.floor((j + 0.5) * in_len / out_len), in_len - 1) for j in range(out_len)]


def ref_bilinear_coord(out_len: int, in_len: int) -> list[float]:
    """Bilinear (align_corners=False) sample of the ramp 0..in_len-1 = the clamped sample point."""
    return [
        min(max((j + 0.5) * in_len / out_len - 0.5, 0.0), in_len - 1.0) for j in range(out_len)
    ]


@pytest.mark.parametrize("seed", range(6))
def test_random_scale_matches_reference(seed: int) -> None:
    image, label = coordinate_pair()
    out_img, out_lab = RandomScale(0.5, 1.6)(image, label, torch.Generator().manual_seed(seed))
    h, w = out_lab.shape
    assert 0.5 * H - 1 <= h <= 1.6 * H + 1 and 0.5 * W - 1 <= w <= 1.6 * W + 1
    assert abs(h / H - w / W) < 0.1  # one factor for both sides
    src_y, src_x = ref_nearest_src(h, H), ref_nearest_src(w, W)
    coord_y, coord_x = ref_bilinear_coord(h, H), ref_bilinear_coord(w, W)
    for i in range(h):
        for j in range(w):
            assert out_lab[i, j].item() == src_x[j] + W * src_y[i]
            assert out_img[0, i, j].item() == pytest.approx(coord_x[j], abs=1e-4)
            assert out_img[1, i, j].item() == pytest.approx(coord_y[i], abs=1e-4)
    assert out_lab.dtype == torch.int64 and out_img.dtype == torch.float32


def test_scale_never_invents_label_values() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([0, 3, 7, 255])
    label = values[torch.randint(4, (H, W), generator=g)]
    image = torch.rand(3, H, W, generator=g)
    for seed in range(10):
        _, out = RandomScale(0.3, 2.7)(image, label, torch.Generator().manual_seed(seed))
        assert set(out.unique().tolist()) <= {0, 3, 7, 255}


def test_crop_pads_with_ignore_and_zero() -> None:
    image, label = coordinate_pair()
    image = image + 1.0  # no zeros in the real image, so padding is recognisable
    out_img, out_lab = RandomCrop(H + 5, W + 3)(image, label, torch.Generator().manual_seed(0))
    assert out_img.shape == (3, H + 5, W + 3) and out_lab.shape == (H + 5, W + 3)
    assert torch.equal(out_lab[:H, :W], label) and torch.equal(out_img[:, :H, :W], image)
    assert (out_lab[H:] == 255).all() and (out_lab[:, W:] == 255).all()
    assert (out_img[:, H:] == 0).all() and (out_img[:, :, W:] == 0).all()


def test_crop_is_a_window_of_the_input() -> None:
    image, label = coordinate_pair()
    offsets = set()
    for seed in range(20):
        out_img, out_lab = RandomCrop(5, 7)(image, label, torch.Generator().manual_seed(seed))
        top, left = int(out_img[1, 0, 0]), int(out_img[0, 0, 0])
        offsets.add((top, left))
        assert torch.equal(out_lab, label[top : top + 5, left : left + 7])
        assert torch.equal(out_img, image[:, top : top + 5, left : left + 7])
    assert len(offsets) > 5  # the window really moves


def test_crop_mixed_padding_and_offset() -> None:
    image, label = coordinate_pair()
    out_img, out_lab = RandomCrop(H + 4, 6)(image, label, torch.Generator().manual_seed(3))
    left = int(out_img[0, 0, 0])
    assert torch.equal(out_lab[:H], label[:, left : left + 6])
    assert (out_lab[H:] == 255).all()


def test_flip() -> None:
    image, label = coordinate_pair()
    img1, lab1 = RandomHorizontalFlip(1.0)(image, label, torch.Generator().manual_seed(0))
    assert torch.equal(lab1, label.flip(-1)) and torch.equal(img1, image.flip(-1))
    img0, lab0 = RandomHorizontalFlip(0.0)(image, label, torch.Generator().manual_seed(0))
    assert torch.equal(lab0, label) and torch.equal(img0, image)
    flips = [
        torch.equal(RandomHorizontalFlip(0.5)(image, label, item_generator(0, 0, i))[1], label)
        for i in range(40)
    ]
    assert 5 < sum(flips) < 35


@pytest.mark.parametrize("seed", range(8))
def test_train_transform_keeps_alignment(seed: int) -> None:
    """After scale+crop+flip, each labelled pixel's source is within half a pixel of the point
    the image was sampled at; every padded pixel is 0 in the image and 255 in the label."""
    image, label = coordinate_pair()
    t = train_transform(10, 14, scale=(0.5, 1.6), flip=True)
    out_img, out_lab = t(image, label, item_generator(seed, 0, 0))
    assert out_img.shape == (3, 10, 14) and out_lab.shape == (10, 14)
    padded = out_img[2] == 0
    assert torch.equal(padded, out_lab == 255)
    valid = ~padded
    assert torch.allclose(out_img[2][valid], torch.ones(()))
    src_x, src_y = out_lab[valid] % W, out_lab[valid] // W
    assert (src_x.float() - out_img[0][valid]).abs().max() <= 0.5 + 1e-4
    assert (src_y.float() - out_img[1][valid]).abs().max() <= 0.5 + 1e-4


def test_determinism_for_a_seed() -> None:
    g = torch.Generator().manual_seed(0)
    image, label = torch.rand(3, 20, 24, generator=g), torch.randint(5, (20, 24), generator=g)
    t = train_transform(9, 0, scale=(0.5, 2.0), flip=True)
    a = t(image, label, item_generator(1, 2, 3))
    b = t(image, label, item_generator(1, 2, 3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [t(image, label, item_generator(*k)) for k in [(2, 2, 3), (1, 3, 3), (1, 2, 4)]]
    assert all(not torch.equal(a[0], o[0]) for o in others)


def test_item_generator_streams_differ() -> None:
    draws = {
        torch.rand((), generator=item_generator(s, e, i)).item()
        for s in range(3) for e in range(3) for i in range(3)
    }
    assert len(draws) == 27
    with pytest.raises(ValueError):
        item_generator(0, -1, 0)


def test_identity_scale_skipped_and_compose_order() -> None:
    t = train_transform(4, scale=(1.0, 1.0), flip=False)
    assert [type(s) for s in t.transforms] == [RandomCrop]
    image, label = coordinate_pair()
    out = Compose([RandomHorizontalFlip(1.0), RandomCrop(H, W)])(image, label)
    assert torch.equal(out[1], label.flip(-1))


def test_resize_pair_exact_downscale() -> None:
    image, label = coordinate_pair()
    out_img, out_lab = resize_pair(image, label, (H // 2, W // 2))
    assert torch.equal(out_lab, label[1::2, 1::2])
    # bilinear at exact factor 2 averages each 2x2 block
    assert torch.allclose(out_img, image.reshape(3, H // 2, 2, W // 2, 2).mean((2, 4)))


def test_pad_collate() -> None:
    a = (torch.rand(3, 4, 6), torch.randint(3, (4, 6)))
    b = (torch.rand(3, 7, 5), torch.randint(3, (7, 5)))
    images, labels = pad_collate([a, b])
    assert images.shape == (2, 3, 7, 6) and labels.shape == (2, 7, 6)
    assert torch.equal(images[0, :, :4, :6], a[0]) and torch.equal(labels[1, :7, :5], b[1])
    assert (labels[0, 4:] == 255).all() and (labels[1, :, 5:] == 255).all()
    assert (images[0, :, 4:] == 0).all() and (images[1, :, :, 5:] == 0).all()
    assert labels.dtype == torch.int64
    with pytest.raises(ValueError):
        pad_collate([])


def test_eval_collate_records_each_size() -> None:
    a = (torch.rand(3, 4, 6), torch.randint(3, (4, 6)))
    b = (torch.rand(3, 7, 5), torch.randint(3, (7, 5)))
    batch = eval_collate([a, b, a])
    images, labels = pad_collate([a, b, a])
    assert torch.equal(batch.images, images) and torch.equal(batch.labels, labels)
    assert batch.sizes.tolist() == [[4, 6], [7, 5], [4, 6]]
    images, labels, sizes = eval_collate([b])
    assert sizes.tolist() == [[7, 5]] and images.shape == (1, 3, 7, 5)


def test_mismatched_pair_is_an_error() -> None:
    with pytest.raises(ValueError, match="same H, W"):
        RandomCrop(4)(torch.rand(3, 5, 5), torch.zeros(5, 6, dtype=torch.long))
    with pytest.raises(ValueError):
        RandomScale(2.0, 1.0)
