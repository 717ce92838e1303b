import copy
import math
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision

from ctt.models import (
    MODELS,
    DeepLabV2,
    DeepLabV3Plus,
    TinySegNet,
    WeightsError,
    build_model,
    load_pretrained,
)
from ctt.models.resnet import CAFFE_MEAN_BGR, IMAGENET_MEAN, IMAGENET_STD, InputNorm, ResNetBackbone

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def v2_r50():
    torch.manual_seed(0)
    return DeepLabV2(NUM_CLASSES, depth=50)


def _model_cfg(**model):
    base = dict(arch="tiny", depth=50, resnet_style="torchvision", pretrained="none",
                pretrained_peer="none", feat_dim=64, width=8, fuse="3x3", dropout=0.1)
    base.update(model)
    return SimpleNamespace(model=SimpleNamespace(**base), data=SimpleNamespace(num_classes=7))


def _factories():
    return {
        "tiny": lambda: TinySegNet(NUM_CLASSES, width=8, feat_dim=32),
        "v2": lambda: DeepLabV2(NUM_CLASSES, depth=50, feat_dim=64),
        "v3plus_os16": lambda: DeepLabV3Plus(NUM_CLASSES, depth=50, feat_dim=64, output_stride=16),
        "v3plus_os8": lambda: DeepLabV3Plus(NUM_CLASSES, depth=50, feat_dim=64, output_stride=8),
        "tiny_1x1": lambda: TinySegNet(NUM_CLASSES, width=8, feat_dim=32, fuse="1x1"),
    }


@pytest.mark.parametrize("name", list(_factories()))
def test_shapes_norms_and_classifier_input(name):
    torch.manual_seed(0)
    model = _factories()[name]()
    head = model.head
    seen = {}
    head.classifier.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    sizes = [(33, 47), (65, 65)] if name.startswith("tiny") else [(33, 47)]
    for train in (True, False):
        model.train(train)
        for h, w in sizes:
            logits, feats = model(torch.rand(2, 3, h, w))
            os_ = model.output_stride
            assert logits.shape == (2, NUM_CLASSES, math.ceil(h / os_), math.ceil(w / os_))
            assert feats.shape == (2, head.classifier.in_channels, *logits.shape[2:])
            assert torch.allclose(feats.norm(dim=1), torch.ones(()), atol=1e-5)
            # feats are the normalised version of exactly what the classifier reads
            assert torch.allclose(feats, F.normalize(seen["x"], dim=1), atol=1e-6)
            assert not torch.allclose(seen["x"].norm(dim=1), torch.ones(()), atol=1e-3)


@pytest.mark.parametrize("name", list(_factories())[:3])
def test_param_groups_disjoint_complete_and_trained(name):
    model = _factories()[name]()
    bb, hd = model.backbone_parameters(), model.head_parameters()
    ids_bb, ids_hd = {id(p) for p in bb}, {id(p) for p in hd}
    assert bb and hd and not ids_bb & ids_hd
    assert ids_bb | ids_hd == {id(p) for p in model.parameters()}
    assert ids_bb == {id(p) for p in model.backbone.parameters()}
    assert id(model.head.classifier.weight) in ids_hd
    if name == "tiny":  # every parameter takes part in the forward pass
        logits, feats = model(torch.rand(2, 3, 32, 32))
        (logits.sum() + feats.sum()).backward()
        assert all(p.grad is not None for p in model.parameters())


def test_tiny_fuse_kernel_is_the_only_difference_between_its_options():
    """`fuse=1x1` swaps the decoder's 3x3 fuse conv for a 1x1 one and changes nothing else;
    the default stays 3x3 (tiny-v1's network), and an unknown kernel is refused."""
    nets = {k: TinySegNet(NUM_CLASSES, width=8, feat_dim=32, **kw)
            for k, kw in (("default", {}), ("3x3", {"fuse": "3x3"}), ("1x1", {"fuse": "1x1"}))}
    shapes = {k: {n: tuple(t.shape) for n, t in net.state_dict().items()}
              for k, net in nets.items()}
    assert shapes["default"] == shapes["3x3"]
    fuse = "head.fuse.0.weight"
    assert shapes["3x3"][fuse] == (32, 48, 3, 3) and shapes["1x1"][fuse] == (32, 48, 1, 1)
    assert {n: s for n, s in shapes["1x1"].items() if n != fuse} == {
        n: s for n, s in shapes["3x3"].items() if n != fuse}
    assert build_model(_model_cfg(fuse="1x1")).head.fuse[0].kernel_size == (1, 1)
    with pytest.raises(ValueError, match="model.fuse must be one of 3x3, 1x1, got '5x5'"):
        TinySegNet(NUM_CLASSES, fuse="5x5")


def test_tiny_is_small_and_normalises_inputs_without_state():
    model = TinySegNet(21, width=16, feat_dim=256)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert not any(k.startswith("input_norm") for k in model.state_dict())
    assert {n for n, _ in model.named_buffers()} >= {"input_norm.mean", "input_norm.std"}


def test_input_norm_styles():
    x = torch.rand(2, 3, 4, 5)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(InputNorm("torchvision")(x), (x - mean) / std, atol=1e-6)
    bgr_mean = torch.tensor(CAFFE_MEAN_BGR).view(3, 1, 1)
    assert torch.allclose(InputNorm("caffe")(x), x[:, [2, 1, 0]] * 255 - bgr_mean, atol=1e-3)
    with pytest.raises(ValueError, match="resnet_style"):
        InputNorm("tf")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        InputNorm()(torch.rand(3, 4, 5))


def test_caffe_style_moves_strides_keeps_shapes():
    tv, caffe = ResNetBackbone(50, 8, "torchvision"), ResNetBackbone(50, 8, "caffe")
    assert tv.layer2[0].conv1.stride == (1, 1) and tv.layer2[0].conv2.stride == (2, 2)
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)
    # the reference dilates every block of a dilated stage, the first one included
    assert tv.layer3[0].conv2.dilation == (1, 1) and caffe.layer3[0].conv2.dilation == (2, 2)
    assert caffe.layer4[0].conv2.dilation == (4, 4) and caffe.layer4[0].conv2.padding == (4, 4)
    assert tv.state_dict().keys() == caffe.state_dict().keys()
    caffe.load_state_dict(tv.state_dict())
    for h, w in [(33, 47), (40, 40)]:
        x = torch.rand(1, 3, h, w)
        (lt, ht), (lc, hc) = tv(x), caffe(x)
        assert lt.shape == lc.shape and ht.shape == hc.shape == (1, 2048, math.ceil(h / 8),
                                                                 math.ceil(w / 8))
        assert not torch.allclose(ht, hc)  # same weights, different computation


def test_r101_builds_quickly():
    t0 = time.perf_counter()
    model = DeepLabV2(21, depth=101)
    assert time.perf_counter() - t0 < 5
    assert len(model.backbone.layer3) == 23 and model.output_stride == 8


def _random_like(state):
    g = torch.Generator().manual_seed(1)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
            for k, v in state.items()}


def _assert_backbone_equals(model, state):
    own = model.backbone.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def test_load_torchvision_imagenet_state_dict(v2_r50, tmp_path):
    model = copy.deepcopy(v2_r50)
    head_before = copy.deepcopy(model.head.state_dict())
    state = _random_like(torchvision.models.resnet50(weights=None).state_dict())
    torch.save(state, tmp_path / "r50.pth")
    report = load_pretrained(model, tmp_path / "r50.pth")
    assert report["format"] == "backbone" and set(report["dropped"]) == {"fc.weight", "fc.bias"}
    _assert_backbone_equals(model, {k: v for k, v in state.items() if not k.startswith("fc.")})
    for k, v in model.head.state_dict().items():
        assert torch.equal(v, head_before[k]), k


@pytest.fixture(scope="module")
def v2_r50_caffe():
    torch.manual_seed(0)
    return DeepLabV2(NUM_CLASSES, depth=50, resnet_style="caffe")


def _reference_checkpoint(backbone_state, prefix, classifier=True):
    """The reference checkpoint: torchvision-style names, no num_batches_tracked, a `layer5`
    classifier, a prefix from its wrappers (AdvSemiSeg/ClassMix: `Scale.`)."""
    state = {k: v for k, v in _random_like(backbone_state).items()
             if not k.endswith("num_batches_tracked")}
    file_state = {prefix + k: v for k, v in state.items()}
    for i in range(4 if classifier else 0):
        file_state[f"{prefix}layer5.conv2d_list.{i}.weight"] = torch.randn(21, 2048, 3, 3)
        file_state[f"{prefix}layer5.conv2d_list.{i}.bias"] = torch.randn(21)
    return state, file_state


@pytest.mark.parametrize("prefix, classifier", [
    ("Scale.", True), ("module.", True), ("module.Scale.", False)])
def test_load_reference_deeplabv2_layout(v2_r50_caffe, tmp_path, prefix, classifier):
    model = copy.deepcopy(v2_r50_caffe)
    state, file_state = _reference_checkpoint(model.backbone.state_dict(), prefix, classifier)
    torch.save({"state_dict": file_state}, tmp_path / "ref.pth")  # sometimes nested
    report = load_pretrained(model, tmp_path / "ref.pth")
    assert report["format"] == "backbone" and report["layout"] == "caffe"
    assert len(report["dropped"]) == (8 if classifier else 0)
    assert report["loaded"] == len(state)
    _assert_backbone_equals(model, state)


@pytest.mark.parametrize("keys", [
    ["Scale.conv1.weight", "Scale.layer1.0.conv1.weight"],  # AdvSemiSeg/ClassMix wrapper
    ["module.Scale.conv1.weight", "module.Scale.layer1.0.conv1.weight"],
    ["conv1.weight", "layer1.0.conv1.weight", "layer5.conv2d_list.0.weight"],  # its classifier
])
def test_reference_layout_into_torchvision_style_names_the_setting(v2_r50, tmp_path, keys):
    """Same key names, other strides and input normalisation: never a silent load. The layout
    is told by the keys alone, so a few small tensors stand in for the checkpoint."""
    model = copy.deepcopy(v2_r50)
    before = copy.deepcopy(model.state_dict())
    torch.save({"state_dict": {k: torch.zeros(2) for k in keys}}, tmp_path / "coco.pth")
    with pytest.raises(WeightsError, match=r"coco\.pth.*caffe.*torchvision style.*"
                                           r"set model\.resnet_style=caffe$"):
        load_pretrained(model, tmp_path / "coco.pth")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_build_model_refuses_the_reference_checkpoint_in_torchvision_style(tmp_path):
    torch.save({"Scale.conv1.weight": torch.zeros(2)}, tmp_path / "coco.pth")
    cfg = _model_cfg(arch="deeplabv2", pretrained=str(tmp_path / "coco.pth"))
    with pytest.raises(WeightsError, match="model.resnet_style=caffe") as err:
        build_model(cfg)
    assert "\n" not in str(err.value)


def test_torchvision_weights_load_into_a_caffe_style_model(v2_r50_caffe, tmp_path):
    """The reference's second student: torchvision ImageNet weights in the caffe layout."""
    model = copy.deepcopy(v2_r50_caffe)
    state = _random_like(torchvision.models.resnet50(weights=None).state_dict())
    torch.save(state, tmp_path / "r50.pth")
    report = load_pretrained(model, tmp_path / "r50.pth")
    assert report["layout"] == "other" and report["format"] == "backbone"
    _assert_backbone_equals(model, {k: v for k, v in state.items() if not k.startswith("fc.")})


def test_load_own_full_state_dict_and_build_model(tmp_path):
    torch.manual_seed(1)
    src = build_model(_model_cfg())
    torch.save(src.state_dict(), tmp_path / "full.pth")
    torch.manual_seed(2)
    cfg = _model_cfg(pretrained_peer=str(tmp_path / "full.pth"))
    peer, other = build_model(cfg, student=1), build_model(cfg, student=0)
    for k, v in src.state_dict().items():
        assert torch.equal(peer.state_dict()[k], v), k
    assert not torch.equal(other.head.classifier.weight, src.head.classifier.weight)
    # a 21-class checkpoint for a 7-class model is a shape mismatch on the classifier
    torch.save(TinySegNet(21, width=8, feat_dim=64).state_dict(), tmp_path / "c21.pth")
    with pytest.raises(ValueError, match=r"c21\.pth.*head\.classifier\.weight"):
        build_model(_model_cfg(pretrained=str(tmp_path / "c21.pth")))


def test_build_model_registry_and_errors():
    assert set(MODELS) == {"tiny", "deeplabv2", "deeplabv3plus"}
    model = build_model(_model_cfg())
    assert isinstance(model, TinySegNet) and model.head.classifier.out_channels == 7
    with pytest.raises(ValueError, match="deeplabv2, deeplabv3plus, tiny"):
        build_model(_model_cfg(arch="unet"))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_model(_model_cfg(pretrained="/nonexistent/nowhere.pth"))


def test_load_errors_name_file_and_keys(v2_r50, tmp_path):
    model = copy.deepcopy(v2_r50)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_pretrained(model, tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_pretrained(model, tmp_path / "junk.pth")

    good = torchvision.models.resnet50(weights=None).state_dict()
    bad_shape = dict(good, **{"layer4.2.conv3.weight": torch.zeros(2048, 512, 3, 3)})
    torch.save(bad_shape, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape\.pth.*shape mismatch.*layer4\.2\.conv3\.weight"):
        load_pretrained(model, tmp_path / "shape.pth")
    missing = {k: v for k, v in good.items() if not k.startswith("layer4.2.bn3.")}
    torch.save(missing, tmp_path / "hole.pth")
    with pytest.raises(ValueError, match=r"hole\.pth.*missing.*layer4\.2\.bn3\.weight"):
        load_pretrained(model, tmp_path / "hole.pth")
    # a ResNet-101 file for a ResNet-50 model: nothing missing, but layer3.6+ left over
    torch.save(torchvision.models.resnet101(weights=None).state_dict(), tmp_path / "r101.pth")
    with pytest.raises(ValueError, match=r"r101\.pth.*unexpected.*layer3\.6\."):
        load_pretrained(model, tmp_path / "r101.pth")
    for k, v in model.state_dict().items():  # failed loads change nothing
        assert torch.equal(v, before[k]), k

    report = load_pretrained(model, tmp_path / "hole.pth", strict_backbone=False)
    assert report["missing"] == ["layer4.2.bn3.weight", "layer4.2.bn3.bias",
                                 "layer4.2.bn3.running_mean", "layer4.2.bn3.running_var"]
    assert torch.equal(model.backbone.conv1.weight, good["conv1.weight"])
    assert torch.equal(model.backbone.layer4[2].bn3.weight, before["backbone.layer4.2.bn3.weight"])
