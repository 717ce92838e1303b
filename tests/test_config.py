import json
import subprocess
import sys

import pytest

from ctt.config import (
    PRESETS,
    VARIANTS,
    ConfigError,
    CTTConfig,
    apply_variant,
    check_semantics,
    get_preset,
    inert_keys,
    parse_set_args,
)
from ctt.errors import DeviceError
from ctt.tune.cli import SMOKE_OVERRIDES


def test_flat_roundtrip_every_preset():
    for name, cfg in PRESETS.items():
        flat = cfg.to_flat()
        assert all(isinstance(v, (str, int, float, bool)) for v in flat.values()), name
        assert all(v is not None for v in flat.values())
        assert CTTConfig.from_flat(flat) == cfg


def config_from_json(text: str) -> CTTConfig:
    """What a reader of a run's ``config.json`` does: the flat dict under ``"config"``."""
    return CTTConfig.from_flat(json.loads(text)["config"])


def test_json_roundtrip(tmp_path):
    cfg = PRESETS["tiny"].override({"method.ema_decay": 0.999, "run.seed": 3})
    path = tmp_path / "config.json"
    cfg.to_json(path, versions={"torch": "x"})
    assert json.loads(path.read_text())["versions"] == {"torch": "x"}
    assert config_from_json(path.read_text()) == cfg
    assert config_from_json(cfg.to_json()) == cfg


def test_presets_have_paper_values():
    voc = PRESETS["voc-r101"]
    assert voc.model.arch == "deeplabv2" and voc.model.depth == 101
    assert voc.method.tau_h == 0.1 and voc.method.tau_l == 0.5 and voc.method.ema_decay == 0.99
    assert voc.method.tau_p == 0.968 and voc.method.tau_bank == 0.95 and voc.method.bank_size == 256
    assert voc.optim.lr == 2.5e-4 and voc.optim.head_lr_mult == 10 and voc.optim.iters == 160_000
    assert voc.data.batch_size == 10 and voc.data.crop_size == 321
    assert PRESETS["voc-r101-v3plus"].model.arch == "deeplabv3plus"
    cs = PRESETS["cityscapes-r101"]
    assert cs.data.num_classes == 19 and cs.optim.iters == 16_000 and cs.data.crop_width == 512
    tiny = PRESETS["tiny"]
    assert tiny.model.arch == "tiny" and tiny.data.num_classes == 7


def test_tiny_v1_keeps_the_first_embedded_default():
    """`tiny-v1` is the testbed behind README's first results table: its values stay put, and
    a config.json written before `model.fuse` existed still reads as that network."""
    v1 = PRESETS["tiny-v1"]
    assert (v1.model.arch, v1.model.width, v1.model.fuse, v1.model.feat_dim) == (
        "tiny", 24, "3x3", 64)
    assert (v1.data.crop_size, v1.data.batch_size, v1.data.batch_size_u) == (48, 8, 8)
    assert (v1.optim.iters, v1.method.warmup_iters, v1.run.eval_every) == (2000, 400, 200)
    assert (v1.method.max_anchors, v1.method.bank_size, v1.method.bank_min_fill) == (256, 64, 16)
    old_json = {k: v for k, v in v1.to_flat().items() if k != "model.fuse"}
    assert CTTConfig.from_flat(old_json) == v1
    assert get_preset("tiny-v1") is v1


def test_tiny_is_tiny_v1_with_a_cheaper_step_and_a_shorter_warmup():
    """The embedded default differs from tiny-v1 only where README's tuning rows (seeds
    100-102) say it does: the data, the optimiser and the loss terms stay."""
    v1, new = PRESETS["tiny-v1"].to_flat(), PRESETS["tiny"].to_flat()
    assert {k: (v1[k], new[k]) for k in v1 if v1[k] != new[k]} == {
        "model.width": (24, 16), "model.fuse": ("3x3", "1x1"),
        "method.max_anchors": (256, 128), "method.bank_size": (64, 32),
        "method.warmup_iters": (400, 200)}


def test_fuse_acts_on_the_tiny_net_only():
    assert "model.fuse" in inert_keys(PRESETS["voc-r101"])
    assert "model.fuse" not in inert_keys(PRESETS["tiny"])
    with pytest.raises(ConfigError, match="model.fuse: invalid value '5x5'; valid choices: "
                                          "'3x3', '1x1'"):
        PRESETS["tiny"].override({"model.fuse": "5x5"})


def test_reference_forward_and_augmentation_draws_on_paper_presets():
    for name in ("voc-r101", "voc-r101-v3plus", "cityscapes-r101"):
        m = PRESETS[name].method
        assert m.student_forward == "separate" and m.jitter_blur_per == "batch", name
    assert PRESETS["cityscapes-r101"].data.flip is False  # the reference does not flip there
    tiny = PRESETS["tiny"].method
    assert tiny.student_forward == "joint" and tiny.jitter_blur_per == "sample"
    for key, good, bad in (("method.student_forward", "joint", "both"),
                           ("method.jitter_blur_per", "sample", "image")):
        assert PRESETS["voc-r101"].override({key: good}).to_flat()[key] == good
        with pytest.raises(ConfigError, match=f"{key}: invalid value '{bad}'"):
            PRESETS["voc-r101"].override({key: bad})


def test_tiny_deviations_are_documented():
    """Every field where tiny departs from the paper preset says so in its docstring."""
    tiny, paper = PRESETS["tiny"].to_flat(), PRESETS["voc-r101"].to_flat()
    for key in tiny:
        if key.startswith("run.") or tiny[key] == paper[key]:
            continue
        assert "tiny" in CTTConfig.field_doc(key), key


def test_unknown_key_names_key_and_valid_choices():
    with pytest.raises(ConfigError) as e:
        CTTConfig.from_flat({"method.ema_dcay": 0.9})
    msg = str(e.value)
    assert "method.ema_dcay" in msg and "method.ema_decay" in msg and "Valid keys" in msg


@pytest.mark.parametrize(("key", "suggested"), [
    ("method.lr", ["optim.lr"]),              # right field, wrong section
    ("optim.lambda_h", ["method.lambda_h"]),
    ("lr", ["optim.lr"]),                     # no section at all
    ("method.lamda_h", ["method.lambda_h", "method.lambda_u", "method.lambda_l"]),
    ("run.evaluate_every", ["run.eval_every"]),
])
def test_unknown_key_suggests_keys_of_every_section(key, suggested):
    with pytest.raises(ConfigError) as e:
        PRESETS["tiny"].override({key: 1})
    msg = str(e.value)
    hint = msg.split("did you mean ", 1)[1].split("?", 1)[0]
    assert hint == " or ".join(repr(k) for k in suggested)
    assert "\n" not in msg and msg.startswith(f"unknown config key {key!r}")
    if "." in key:  # the section's keys are listed, not all 60+
        section = key.split(".")[0]
        listed = msg.split(f"Valid keys in {section}: ", 1)[1]
        assert all(k.split(".")[0] == section for k in listed.split(" (sections")[0].split(", "))


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("method.tau_h", -0.1, "method.tau_h"),
        ("method.tau_l", 0.0, "method.tau_l"),
        ("method.ema_decay", 1.0, "[0, 1)"),
        ("method.ema_decay", -0.5, "method.ema_decay"),
        ("method.mix", "mixup", "'classmix', 'cutmix', 'none'"),
        ("method.unsup", "both", "'none', 'self', 'cross'"),
        ("method.pairs", 3, "method.pairs"),
        ("model.arch", "unet", "'tiny', 'deeplabv2', 'deeplabv3plus'"),
        ("method.lambda_h", float("nan"), "finite"),
        ("method.pairs", "two", "expected an integer"),
        ("method.shared_aug", "maybe", "expected a bool"),
    ],
)
def test_bad_values_raise_clear_errors(key, value, fragment):
    with pytest.raises(ConfigError) as e:
        PRESETS["tiny"].override({key: value})
    assert key in str(e.value) and fragment in str(e.value)


def test_cli_strings_are_coerced():
    cfg = PRESETS["tiny"].override(parse_set_args(
        ["method.pairs=2", "method.shared_aug=false", "method.lambda_h=0.25", "run.seed=7"]))
    assert cfg.method.pairs == 2 and cfg.method.shared_aug is False
    assert cfg.method.lambda_h == 0.25 and cfg.run.seed == 7
    with pytest.raises(ConfigError, match="key=value"):
        parse_set_args(["method.pairs"])


def test_cross_needs_two_pairs():
    with pytest.raises(ConfigError, match="pairs=2"):
        PRESETS["tiny"].override({"method.pairs": 1, "method.unsup": "cross"})


def test_variants_are_overrides_only():
    base = PRESETS["tiny"]
    for name, overrides in VARIANTS.items():
        cfg = apply_variant(base, name)
        changed = {k for k, v in cfg.to_flat().items() if base.to_flat()[k] != v}
        assert changed <= set(overrides), (name, changed)
    sup = apply_variant(base, "supervised")
    assert sup.method.pairs == 1 and sup.method.unsup == "none"
    assert apply_variant(base, "mean_teacher").method.pairs == 1
    assert apply_variant(base, "dual_self").method.unsup == "self"
    assert apply_variant(base, "cross").method.lambda_h == 0.0
    assert apply_variant(base, "cross_hc").method.lambda_l == 0.0
    assert apply_variant(base, "cross_hc").method.lambda_h == base.method.lambda_h
    assert apply_variant(base, "cross_lc").method.lambda_h == 0.0
    with pytest.raises(ConfigError, match="valid variants"):
        apply_variant(base, "nope")
    with pytest.raises(ConfigError, match="valid presets"):
        get_preset("nope")


def test_import_ctt_without_ray_or_optuna():
    code = (
        "import sys, importlib, pkgutil\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'optuna'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ctt\n"
        "for m in pkgutil.walk_packages(ctt.__path__, 'ctt.'):\n"
        "    if m.name.startswith('ctt.tune'):\n"
        "        continue\n"
        "    importlib.import_module(m.name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_bank_min_fill_above_bank_size_is_refused():
    with pytest.raises(ConfigError, match=r"bank_min_fill=16 exceeds method.bank_size=8.*<= 8"):
        PRESETS["tiny"].override({"method.bank_size": 8})  # tiny: min_fill 16
    PRESETS["voc-r101"].override({"method.bank_size": 8})  # all_full ignores min_fill


def _cfg(variant: str, **flat) -> CTTConfig:
    return apply_variant(PRESETS["tiny"], variant).override(flat)


@pytest.mark.parametrize(("variant", "flat", "study", "pattern"), [
    ("mean_teacher", {"method.lambda_l": 0.5}, False,
     r"method.lambda_l=0.5 cannot act with method.pairs=1 \(variant mean_teacher\).*"
     r"set method.lambda_l=0"),
    ("supervised", {"method.lambda_h": 0.1}, False,
     r"method.lambda_h=0.1 cannot act with method.unsup='none'"),
    ("supervised", {"method.lambda_u": 1.0, "method.lambda_l": 0.2}, False,
     r"method.lambda_u=1, method.lambda_l=0.2 cannot act"),
    ("ctt", {"optim.iters": 6}, False,
     r"optim.iters=6 <= method.warmup_iters=200 \(variant ctt\).*--set method.warmup_iters=1"),
    ("mean_teacher", {"optim.iters": 200}, False, r"optim.iters=200 <= method.warmup_iters=200"),
    ("ctt", {"run.checkpoint_every": 300}, True,
     r"run.checkpoint_every=300 is not a multiple of run.eval_every=200.*every 600 iterations"),
])
def test_settings_that_cannot_act_are_refused(variant, flat, study, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        check_semantics(_cfg(variant, **flat), variant, study=study)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("variant", "flat", "study"), [
    ("supervised", {"optim.iters": 6}, True),        # a supervised run has no warm-up to pass
    ("ctt", {"optim.iters": 201}, True),
    ("ctt", {"run.checkpoint_every": 300}, False),    # ctt.train checkpoints on its own
    ("ctt", {"run.checkpoint_every": 400}, True),
    ("mean_teacher", {"method.lambda_h": 0.3}, True),  # high-level contrast runs on one pair
])
def test_settings_that_can_act_pass(variant, flat, study):
    assert check_semantics(_cfg(variant, **flat), variant, study=study) == []


def test_every_preset_variant_and_the_smoke_settings_pass_as_studies():
    for preset in PRESETS.values():
        for cfg in (preset, preset.override(SMOKE_OVERRIDES)):
            for variant in VARIANTS:
                assert check_semantics(apply_variant(cfg, variant), variant, study=True) == []


def test_inert_settings_the_user_set_are_warned_about():
    cfg = _cfg("cross", **{"method.tau_h": 0.3, "method.tau_p": 0.9})
    warnings = check_semantics(cfg, "cross", set_keys=["method.tau_h", "method.tau_p"])
    assert warnings == ["method.tau_h=0.3 has no effect (variant cross): method.lambda_h=0 "
                        "switches the high-level contrast off"]
    # preset values are never reported, only what the user set
    assert check_semantics(_cfg("supervised"), "supervised") == []
    sup = inert_keys(_cfg("supervised"))
    assert {"method.tau_p", "method.bank_size", "method.warmup_iters"} <= set(sup)
    assert "method.ema_decay" not in sup  # the supervised run still keeps an EMA teacher
    assert {"method.tau_l", "method.low_gate", "model.pretrained_peer"} <= set(
        inert_keys(_cfg("mean_teacher")))
    assert not set(inert_keys(_cfg("ctt"))) & {k for k in PRESETS["tiny"].to_flat()
                                               if k.startswith("method.")}
    zero = check_semantics(_cfg("dual_self", **{"method.lambda_u": 0.0}), "dual_self")
    assert len(zero) == 1 and "use --variant supervised" in zero[0]


def test_cuda_without_a_device_is_refused_locally(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _cfg("ctt", **{"run.device": "cuda"})
    with pytest.raises(DeviceError, match="use --device cpu"):
        check_semantics(cfg, "ctt", local=True)
    assert check_semantics(cfg, "ctt", study=True) == []  # a cluster's nodes may have one
