import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctt.evaluate import confusion_matrix, evaluate, miou
from ctt.models import TinySegNet

C = 5


def _slow_cm(pred, target, num_classes, ignore=255):
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(np.asarray(pred).ravel().tolist(), np.asarray(target).ravel().tolist()):
        if t != ignore:
            cm[t, p] += 1
    return cm


def _slow_iou(pred, target, num_classes, ignore=255):
    """IoU per class straight from the pixels, float64; NaN where the class is nowhere."""
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    valid = target != ignore
    out = []
    for c in range(num_classes):
        inter = np.sum((pred == c) & (target == c) & valid)
        union = np.sum(((pred == c) | (target == c)) & valid)
        out.append(100.0 * inter / union if union else float("nan"))
    return out


def _random_pair(seed, shape=(3, 7, 9), num_classes=C, absent=()):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, num_classes, shape, generator=g)
    target = torch.randint(0, num_classes, shape, generator=g)
    target[torch.rand(shape, generator=g) < 0.2] = 255
    for c in absent:
        pred[pred == c] = (c + 1) % num_classes
        target[target == c] = 255
    return pred, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_and_miou_match_pixel_loops(seed):
    pred, target = _random_pair(seed, absent=(3,) if seed == 2 else ())
    cm = confusion_matrix(pred, target, C)
    assert cm.dtype == torch.int64 and cm.shape == (C, C)
    np.testing.assert_array_equal(cm.numpy(), _slow_cm(pred, target, C))
    mean, per_class = miou(cm)
    ref = _slow_iou(pred, target, C)
    np.testing.assert_allclose(per_class, ref, rtol=1e-12)  # NaN positions must agree too
    assert mean == pytest.approx(np.nanmean(ref), rel=1e-12)
    if seed == 2:
        assert math.isnan(per_class[3]) and not math.isnan(mean)


def test_class_only_predicted_counts_with_zero_iou():
    pred = torch.tensor([0, 0, 1, 2])
    target = torch.tensor([0, 0, 1, 1])
    mean, per_class = miou(confusion_matrix(pred, target, 4))
    assert per_class[:3] == pytest.approx([100.0, 50.0, 0.0]) and math.isnan(per_class[3])
    assert mean == pytest.approx(50.0)


def test_all_ignore_gives_zero_not_nan():
    pred = torch.zeros(2, 4, 4, dtype=torch.long)
    cm = confusion_matrix(pred, torch.full((2, 4, 4), 255), C)
    assert int(cm.sum()) == 0
    mean, per_class = miou(cm)
    assert mean == 0.0 and all(math.isnan(v) for v in per_class)
    assert miou(torch.zeros(C, C, dtype=torch.long))[0] == 0.0


def test_bad_inputs_are_errors():
    target = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="pred values"):
        confusion_matrix(torch.tensor([0, 1, C, 0]), target, C)
    with pytest.raises(ValueError, match="pred values"):
        confusion_matrix(torch.tensor([0, -1, 0, 0]), target, C)
    with pytest.raises(ValueError, match="target values"):
        confusion_matrix(target, torch.tensor([0, 7, 255, 0]), C)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(target, target[:3], C)


class _Recorder(torch.nn.Module):
    """Wraps a model and records the grad mode it was called in."""

    def __init__(self, model):
        super().__init__()
        self.model, self.grad_modes = model, []

    def forward(self, x):
        self.grad_modes.append(torch.is_grad_enabled())
        return self.model(x)


@pytest.mark.parametrize("start_training", [True, False])
def test_evaluate_matches_hand_computed_confusion(start_training):
    torch.manual_seed(0)
    model = _Recorder(TinySegNet(C, width=4, feat_dim=16))
    g = torch.Generator().manual_seed(3)
    batches = []
    for size in [(2, 3, 20, 28), (1, 3, 24, 24)]:  # different sizes, like padded VOC batches
        images = torch.rand(size, generator=g)
        labels = torch.randint(0, C, (size[0], *size[2:]), generator=g)
        labels[:, -5:, :] = 255  # padding
        batches.append((images, labels, "extra item ignored"))
    # warm the BN running stats in train mode so eval mode really differs from train mode
    model.train()
    for images, _, _ in batches:
        model(images)
    model.train(start_training)

    result = evaluate(model, batches, C)
    assert model.training is start_training and not any(model.grad_modes[2:])

    model.eval()
    cm = np.zeros((C, C), dtype=np.int64)
    with torch.no_grad():
        for images, labels, _ in batches:
            logits = F.interpolate(model(images)[0], size=labels.shape[-2:], mode="bilinear",
                                   align_corners=True)
            cm += _slow_cm(logits.argmax(1), labels, C)
    np.testing.assert_array_equal(result["confusion"].numpy(), cm)
    iou = [100 * cm[c, c] / (cm[c].sum() + cm[:, c].sum() - cm[c, c]) for c in range(C)
           if cm[c].sum() + cm[:, c].sum()]
    assert result["miou"] == pytest.approx(np.mean(iou))
    assert result["pixel_acc"] == pytest.approx(100 * np.trace(cm) / cm.sum())
    assert len(result["per_class"]) == C


def test_evaluate_all_ignore_labels():
    model = TinySegNet(C, width=4, feat_dim=16)
    batches = [(torch.rand(1, 3, 16, 16), torch.full((1, 16, 16), 255))]
    result = evaluate(model, batches, C)
    assert result["miou"] == 0.0 and result["pixel_acc"] == 0.0


# --- predictions do not depend on batch mates ---------------------------------------------------

class _GlobalMeanNet(torch.nn.Module):
    """Class 1 where the red channel is above the image's mean red (global pooling), else 0."""

    def forward(self, x):
        r = x[:, :1]
        score = r - r.mean(dim=(2, 3), keepdim=True)
        return torch.cat([-score, score], dim=1), score


class _OutputRecorder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x):
        out = self.model(x)
        self.calls.append((x, out[0]))
        return out


def _mixed_size_set(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for h, w in [(20, 24), (33, 41), (20, 24), (28, 28), (33, 41)]:
        image = torch.rand(3, h, w, generator=g)
        items.append((image, torch.randint(0, 2, (h, w), generator=g)))
    return items


def test_prediction_is_the_same_alone_and_among_larger_images():
    from torch.utils.data import DataLoader

    from ctt.data.loader import eval_loader
    from ctt.data.transforms import pad_collate

    items = _mixed_size_set()
    model = _GlobalMeanNet()
    batched = evaluate(model, eval_loader(items, batch_size=5), 2)
    alone = sum(evaluate(model, eval_loader([item], batch_size=1), 2)["confusion"]
                for item in items)
    assert torch.equal(batched["confusion"], alone)
    # Without the sizes, the zero padding lowers the small images' mean and moves pixels.
    padded = evaluate(model, DataLoader(items, batch_size=5, collate_fn=pad_collate), 2)
    assert not torch.equal(padded["confusion"], alone)


@pytest.mark.parametrize("arch", ["deeplabv2", "deeplabv3plus"])
def test_deeplab_logits_alone_equal_logits_in_a_mixed_batch(arch):
    """The real heads pool globally (v2: squeeze-excitation; v3+: ASPP image pooling)."""
    from ctt.data.loader import eval_loader
    from ctt.models import DeepLabV2, DeepLabV3Plus

    torch.manual_seed(0)
    net = (DeepLabV2(3, depth=50, feat_dim=64) if arch == "deeplabv2"
           else DeepLabV3Plus(3, depth=50, feat_dim=64))
    model = _OutputRecorder(net)
    items = _mixed_size_set(1)
    evaluate(model, eval_loader(items, batch_size=5), 3)
    assert sorted(x.shape[0] for x, _ in model.calls) == [1, 2, 2]  # one forward per size
    batched = [(x[i], logits[i]) for x, logits in model.calls for i in range(x.shape[0])]
    model.calls.clear()
    net.eval()
    with torch.no_grad():
        for image, _ in items:
            ref = net(image[None])[0][0]
            got = [logits for x, logits in batched if torch.equal(x, image)]
            assert len(got) == 1
            torch.testing.assert_close(got[0], ref, atol=1e-5, rtol=1e-5)
        # and what padding would have done to the smallest image: a visible change
        big = torch.zeros(1, 3, 33, 41)
        big[0, :, :20, :24] = items[0][0]
        alone = net(items[0][0][None])[0][0]
        padded = net(big)[0][0, :, :alone.shape[1], :alone.shape[2]]
        assert (padded - alone).abs().max() > 1e-3
