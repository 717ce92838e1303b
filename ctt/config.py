"""One frozen configuration for a CTT run, named presets and ablation variants.

A run is fully described by :class:`CTTConfig` (five frozen dataclasses). It travels as a flat
dict of dotted keys (``"method.ema_decay": 0.99``) whose values are only ``str``, ``int``,
``float`` or ``bool`` (``None`` never appears: optional paths are the string ``"none"``), so the
same dict is a Ray Tune param space, a Parquet row, a TensorBoard HParams entry and a
``torch.load(weights_only=True)``-safe checkpoint field.

Presets: ``tiny`` (the CPU embedded default, synthetic VOC-layout data; ``tiny-v1`` is its
first, costlier version, kept for reproducing earlier results), ``voc-r101`` (paper:
DeepLab-v2 ResNet-101 on VOC 2012 + SBD), ``voc-r101-v3plus`` (paper's second architecture) and
``cityscapes-r101``. Where ``tiny`` departs from the paper setting, the field docstring says so.

Variants (:data:`VARIANTS`) are the paper's ablation rows, each a dict of overrides and nothing
else; see :func:`apply_variant`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ctt.errors import UserError

__all__ = [
    "CTTConfig",
    "ConfigError",
    "DataConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "PRESETS",
    "RunConfig",
    "VARIANTS",
    "apply_variant",
    "check_semantics",
    "get_preset",
    "inert_keys",
    "parse_set_args",
]


class ConfigError(UserError, ValueError):
    """A configuration key or value is invalid; the message names the key and the valid choices."""


def _opt(default: Any, doc: str, *, choices: tuple | None = None, lo: float | None = None,
         hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Any:
    """A dataclass field carrying its docstring and validation bounds in ``metadata``."""
    meta = {"doc": doc, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open,
            "hi_open": hi_open}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _opt("voc", "Dataset the root must hold: `voc` (Pascal VOC 2012 [+SBD]), "
                      "`cityscapes`, or `synthetic` (the VOC-layout synthetic set, generated "
                      "into the cache on first use; tiny). A root of another layout is refused.",
                      choices=("synthetic", "voc", "cityscapes"))
    root: str = _opt("none", "Dataset root directory, read-only (nothing is ever written there); "
                   "`none` = the synthetic cache directory (data.dataset=synthetic only).")
    labeled_split: str = _opt("1464", "Labeled split name: reads `splits/<name>/labeled.txt` and "
                            "`unlabeled.txt` under the root (or a directory path holding both). "
                            "Paper VOC: 1464 (or 92/183/366/732; reference: 212); tiny: 128 "
                            "(64 left the tiny net too weak for its pseudo-labels to help).")
    val_split: str = _opt("val", "Split used for periodic evaluation and model selection.")
    test_split: str = _opt("none", "Held-out split for the final report (`none` to skip). "
                         "VOC and Cityscapes: none (their test labels are not public; the paper "
                         "reports val). tiny: `test`, the synthetic held-out split.")
    num_classes: int = _opt(21, "Number of classes including background (VOC 21, Cityscapes 19). "
                          "tiny: 7 (6 synthetic object classes + background).", lo=2)
    crop_size: int = _opt(321, "Training crop height (and width unless crop_width > 0). "
                        "tiny: 48, the whole synthetic image.", lo=8)
    crop_width: int = _opt(0, "Training crop width; 0 = square crop (Cityscapes: 512).", lo=0)
    scale_min: float = _opt(0.5, "Random scale lower bound (reference VOC: 0.5). tiny: 1.0, no "
                          "rescaling: resampling a 48 px image smears the 6 px textures that "
                          "identify the synthetic classes (all-labels val mIoU 40 -> 55).",
                          lo=0.0, lo_open=True)
    scale_max: float = _opt(1.6, "Random scale upper bound (reference VOC: 1.6). tiny: 1.0.",
                          lo=0.0, lo_open=True)
    flip: bool = _opt(False, "Random horizontal flip (the reference VOC config has none). "
                    "tiny: on.")
    batch_size: int = _opt(10, "Labeled images per iteration. tiny: 8.", lo=1)
    batch_size_u: int = _opt(10, "Unlabeled images per iteration. tiny: 8.", lo=1)
    num_workers: int = _opt(0, "DataLoader worker processes (0 = load in the training process).",
                          lo=0)
    label_dir: str = _opt("auto", "VOC label directory for bare-id split files: `auto` prefers "
                        "SegmentationClassAug (SBD) when present.")
    eval_size: int = _opt(0, "Cityscapes only: resize every image to eval_size x 2*eval_size "
                        "before training crops and evaluation (reference: 512, i.e. 512x1024); "
                        "0 = native size.", lo=0)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = _opt("deeplabv2", "Segmentation network: `tiny` (CPU), `deeplabv2`, "
                   "`deeplabv3plus`.", choices=("tiny", "deeplabv2", "deeplabv3plus"))
    depth: int = _opt(101, "ResNet depth for the DeepLab backbones.", choices=(50, 101))
    resnet_style: str = _opt("torchvision", "`torchvision` (stride in the 3x3 conv) or `caffe` "
                           "(stride in the 1x1 conv, as the reference's COCO-pretrained "
                           "DeepLab-v2 checkpoint).", choices=("torchvision", "caffe"))
    pretrained: str = _opt("none", "Local weight file for student 0 (ImageNet ResNet, the "
                         "reference DeepLab-v2 checkpoint, or ours); `none` = random init. "
                         "Nothing is ever downloaded.")
    pretrained_peer: str = _opt("none", "Local weight file for student 1 (the reference uses a "
                              "different initialisation per student); `none` = random init.")
    feat_dim: int = _opt(256, "Channels of the penultimate head feature used for contrast. "
                       "tiny: 64 (halves the CPU step time at equal accuracy).", lo=1)
    width: int = _opt(24, "Base width of the `tiny` network (ignored by DeepLab). tiny: 16 "
                    "(tiny-v1: 24).", lo=4)
    fuse: str = _opt("3x3", "Kernel of the `tiny` decoder's fuse conv (skip + upsampled 1/8 map "
                   "-> feat_dim at 1/4 resolution; ignored by DeepLab): `3x3` or `1x1`. tiny: "
                   "1x1 (tiny-v1: 3x3, which held 56 % of the net's multiply-adds).",
                   choices=("3x3", "1x1"))
    output_stride: int = _opt(16, "Backbone output stride of DeepLab-v3+ (8 or 16; the logits "
                            "are at 1/4 either way). DeepLab-v2 is always 8.", choices=(8, 16))
    dropout: float = _opt(0.1, "Dropout2d before the classifier.", lo=0.0, hi=1.0, hi_open=True)


@dataclass(frozen=True)
class MethodConfig:
    unsup: str = _opt("cross", "Unsupervised target: `cross` (peer teacher, CTT), `self` (own "
                    "teacher, mean teacher), `none` (supervised only).",
                    choices=("none", "self", "cross"))
    pairs: int = _opt(2, "Student/teacher pairs: 1 (mean teacher) or 2 (CTT).", choices=(1, 2))
    lambda_u: float = _opt(1.0, "Weight of the unsupervised pseudo-label loss.", lo=0.0)
    lambda_h: float = _opt(0.1, "Weight of the high-level contrastive loss (0 = off).", lo=0.0)
    lambda_l: float = _opt(0.1, "Weight of the low-level contrastive loss (0 = off).", lo=0.0)
    tau_h: float = _opt(0.1, "Temperature of the high-level contrast.", lo=0.0, lo_open=True)
    tau_l: float = _opt(0.5, "Temperature of the low-level contrast.", lo=0.0, lo_open=True)
    ema_decay: float = _opt(0.99, "EMA decay of the teachers, in [0, 1).", lo=0.0, hi=1.0,
                          hi_open=True)
    ema_buffers: str = _opt("copy", "`copy` BN buffers from the student (DEV, needed by eval-mode "
                          "teachers) or `params_only` (reference).",
                          choices=("copy", "params_only"))
    tau_p: float = _opt(0.968, "Pseudo-label confidence threshold.", lo=0.0, hi=1.0)
    tau_high_conf: float = _opt(0.75, "Confidence splitting high-level (>=) from low-level (<) "
                              "anchors on unlabeled pixels.", lo=0.0, hi=1.0)
    tau_bank: float = _opt(0.95, "Softmax probability a correct labeled pixel needs to enter the "
                         "bank (DEV: the reference compares logits).", lo=0.0, hi=1.0)
    bank_size: int = _opt(256, "Per-class queue length Q of each memory bank. tiny: 32 (fills "
                        "within the short CPU budget; tiny-v1: 64).", lo=1)
    bank_ready: str = _opt("all_full", "When contrast switches on (latched): `all_full` "
                         "(reference) or `min_fill`. tiny: `min_fill`.",
                         choices=("all_full", "min_fill"))
    bank_min_fill: int = _opt(32, "Entries per class needed by `min_fill`. tiny: 16.", lo=1)
    mix: str = _opt("classmix", "Mixing of the strong view: `classmix`, `cutmix` or `none`. "
                  "tiny: cutmix (measured on seeds 100-101, see docs/results.md).",
                  choices=("classmix", "cutmix", "none"))
    strong_color: str = _opt("jitter", "Colour part of the strong view: `jitter` (colour jitter + "
                           "blur, the reference) or `permute` (channel permutation, gain/offset, "
                           "greyscale, noise; label-safe only where colour carries no class "
                           "information). tiny: permute (the synthetic palette is shared by all "
                           "classes; blur would also erase the class textures).",
                           choices=("jitter", "permute"))
    shared_aug: bool = _opt(True, "One augmentation shared by both students (DEV; makes the "
                          "low-level positive the same pixel). False = reference.")
    jitter_blur_per: str = _opt("batch", "Unit of the colour-jitter and blur coin flips: `batch` "
                              "(reference: one draw jitters the whole batch or none of it, "
                              "p 0.8, with per-image factors; one draw blurs the whole batch "
                              "or none of it, p 0.5, with one sigma) or `sample` (each image "
                              "its own draws). tiny: sample (unused there: `permute` always "
                              "draws per image).", choices=("batch", "sample"))
    student_forward: str = _opt("separate", "Student forwards per iteration: `separate` "
                              "(reference: labeled and strong unlabeled images in two forwards, "
                              "so BatchNorm normalises each set with its own batch statistics) "
                              "or `joint` (one forward on both, shared statistics). tiny: joint "
                              "(separate lost 6-8 mIoU on tuning seeds 100-102, at equal CPU "
                              "step time; see docs/results.md).",
                              choices=("separate", "joint"))
    teacher_mode: str = _opt("eval", "Teacher mode when labelling: `eval` (DEV) or `train` "
                           "(reference).", choices=("eval", "train"))
    weighting: str = _opt("uniform", "Pseudo-label weighting: `uniform` (reference), `power` "
                        "(conf^6) or `mask` (hard threshold). tiny: power (uniform trains on "
                        "every argmax and collapsed the tiny net to background).",
                        choices=("uniform", "power", "mask"))
    low_gate: bool = _opt(False, "Keep low-level anchors only where the peer is more confident "
                        "(reference DeepLab-v3+ script).")
    max_anchors: int = _opt(0, "Anchors kept per class and loss (seeded); 0 = all (reference). "
                          "tiny: 128 to bound CPU time (tiny-v1: 256).", lo=0)
    warmup_iters: int = _opt(0, "Supervised-only iterations before the unsupervised and "
                           "contrastive terms start (not in the paper; 0 = reference). "
                           "Identical across variants of a seed, so studies fork from it. "
                           "tiny: 200 (10% of the iterations; tiny-v1: 400).", lo=0)


@dataclass(frozen=True)
class OptimConfig:
    iters: int = _opt(160_000, "Total training iterations (reference VOC: 160k; Cityscapes "
                    "16k). tiny: 2,000.", lo=1)
    optimizer: str = _opt("sgd", "`sgd` (reference) or `adamw`. tiny: adamw (trains a "
                        "from-scratch network faster).", choices=("sgd", "adamw"))
    lr: float = _opt(2.5e-4, "Backbone learning rate (head: lr x head_lr_mult). tiny: 3e-3.",
                   lo=0.0, lo_open=True)
    head_lr_mult: float = _opt(10.0, "Head learning-rate multiplier. tiny: 1 (no pretrained "
                             "backbone to protect).", lo=0.0, lo_open=True)
    momentum: float = _opt(0.9, "SGD momentum.", lo=0.0, hi=1.0, hi_open=True)
    weight_decay: float = _opt(5e-4, "Weight decay. tiny: 1e-4.", lo=0.0)
    poly_power: float = _opt(0.9, "Poly schedule power: lr * (1 - i/iters)^power.", lo=0.0)


@dataclass(frozen=True)
class RunConfig:
    seed: int = _opt(0, "Seed: fixes initialisation, data order and augmentation; shared by all "
                   "variants of a study (paired design).", lo=0)
    num_threads: int = _opt(1, "torch CPU threads; bit-exact comparisons need the same value.",
                          lo=1)
    device: str = _opt("auto", "`cpu`, `cuda` or `auto` (cuda when available).",
                     choices=("auto", "cpu", "cuda"))
    eval_every: int = _opt(1000, "Evaluate (and report) every N iterations. tiny: 200.", lo=1)
    checkpoint_every: int = _opt(1000, "Checkpoint every N iterations. tiny: 200.", lo=1)
    log_every: int = _opt(50, "Log training metrics every N iterations.", lo=1)
    amp: str = _opt("none", "Mixed precision: `none` or `bf16` autocast.", choices=("none", "bf16"))


_SECTIONS = ("data", "model", "method", "optim", "run")


@dataclass(frozen=True)
class CTTConfig:
    """The whole run. Build from a preset, override with :meth:`replace` or :meth:`from_flat`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        for section in _SECTIONS:
            sub = getattr(self, section)
            for f in fields(sub):
                _validate(f"{section}.{f.name}", getattr(sub, f.name), f)
        if self.data.scale_min > self.data.scale_max:
            raise ConfigError(
                f"data.scale_min ({self.data.scale_min}) must be <= data.scale_max "
                f"({self.data.scale_max})")
        if self.data.dataset == "cityscapes" and self.data.num_classes != 19:
            raise ConfigError(f"data.num_classes={self.data.num_classes}, but Cityscapes has "
                              "19 evaluated classes (train ids); set data.num_classes=19")
        if self.method.unsup == "cross" and self.method.pairs != 2:
            raise ConfigError("method.unsup='cross' needs method.pairs=2 (a peer teacher); "
                              "use method.unsup='self' for a single pair")
        m = self.method
        if m.bank_ready == "min_fill" and m.bank_min_fill > m.bank_size:
            # the bank could never hold that many entries: contrast would never switch on
            raise ConfigError(f"method.bank_min_fill={m.bank_min_fill} exceeds "
                              f"method.bank_size={m.bank_size}, so the banks could never be "
                              "ready and contrast would never switch on; set "
                              f"method.bank_min_fill <= {m.bank_size}")

    # --- flat dict ------------------------------------------------------------------------
    def to_flat(self) -> dict[str, str | int | float | bool]:
        """Dotted keys -> str/int/float/bool, in a fixed order (sections, then fields)."""
        out: dict[str, str | int | float | bool] = {}
        for section in _SECTIONS:
            sub = getattr(self, section)
            for f in fields(sub):
                out[f"{section}.{f.name}"] = getattr(sub, f.name)
        return out

    @classmethod
    def from_flat(cls, flat: dict[str, Any], base: CTTConfig | None = None) -> CTTConfig:
        """Build from dotted keys on top of ``base`` (default: dataclass defaults).

        Unknown keys raise :class:`ConfigError` listing the valid keys. String values are
        parsed into the field's type (so ``--set method.pairs=1`` works).
        """
        base = base if base is not None else cls()
        valid = base.to_flat()
        updates: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
        for key, value in flat.items():
            if key not in valid:
                raise ConfigError(_unknown_key_message(key, list(valid)))
            section, name = key.split(".", 1)
            updates[section][name] = _coerce(key, value, type(valid[key]))
        kwargs = {s: dataclasses.replace(getattr(base, s), **updates[s]) if updates[s]
                  else getattr(base, s) for s in _SECTIONS}
        return cls(**kwargs)

    def replace(self, **flat: Any) -> CTTConfig:
        """Override by dotted key with ``__`` for the dot: ``cfg.replace(method__pairs=1)``."""
        return CTTConfig.from_flat({k.replace("__", "."): v for k, v in flat.items()}, self)

    def override(self, flat: dict[str, Any]) -> CTTConfig:
        """Return a copy with the given dotted keys overridden."""
        return CTTConfig.from_flat(flat, self)

    # --- JSON -----------------------------------------------------------------------------
    def to_json(self, path: str | Path | None = None, **extra: Any) -> str:
        """Serialise as ``{"config": flat, **extra}``; write it to ``path`` when given."""
        text = json.dumps({"config": self.to_flat(), **extra}, indent=2, sort_keys=False)
        if path is not None:
            from ctt.fileio import atomic_write_text  # no partial config.json on a kill

            atomic_write_text(Path(path), text + "\n")
        return text

    @staticmethod
    def field_doc(key: str) -> str:
        """The docstring of a dotted key (for CLIs and reports)."""
        section, _, name = key.partition(".")
        for f in fields(getattr(CTTConfig(), section)) if section in _SECTIONS else ():
            if f.name == name:
                return f.metadata["doc"]
        raise ConfigError(_unknown_key_message(key, list(CTTConfig().to_flat())))


def _unknown_key_message(key: str, valid: list[str]) -> str:
    """One line naming ``key``, the likeliest valid keys of ANY section, and the valid keys.

    A field set under the wrong section (``method.lr`` for ``optim.lr``) is the common slip,
    and difflib on whole dotted keys misses it (the section dominates the similarity), so the
    field name is matched on its own first, exactly and then fuzzily, before whole keys."""
    import difflib

    by_name: dict[str, list[str]] = {}
    for k in valid:
        by_name.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    name = key.rsplit(".", 1)[-1]
    close = [k for k in by_name.get(name, []) if k != key]  # right field, wrong section
    if not close:
        for similar in difflib.get_close_matches(name, list(by_name), n=3, cutoff=0.75):
            close += by_name[similar]
    if not close:
        close = difflib.get_close_matches(key, valid, n=3)
    close = list(dict.fromkeys(close))[:3]
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    section = key.split(".", 1)[0] if "." in key else ""
    mine = [k for k in valid if k.startswith(section + ".")] if section else []
    if mine:
        listing = (f"Valid keys in {section}: {', '.join(mine)} (sections: "
                   f"{', '.join(dict.fromkeys(k.split('.', 1)[0] for k in valid))})")
    else:
        listing = f"Valid keys: {', '.join(valid)}"
    return f"unknown config key {key!r}: {hint}{listing}"


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Parse ``value`` into ``typ`` (bool/int/float/str); strings from the CLI are accepted."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    as_float = math.nan
                if as_float.is_integer():
                    return int(as_float)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if value is None:
        return "none"
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _validate(key: str, value: Any, f: dataclasses.Field) -> None:
    m = f.metadata
    if m.get("choices") is not None and value not in m["choices"]:
        raise ConfigError(f"{key}: invalid value {value!r}; valid choices: "
                          f"{', '.join(repr(c) for c in m['choices'])}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
        lo, hi = m.get("lo"), m.get("hi")
        lo_bad = lo is not None and (value <= lo if m["lo_open"] else value < lo)
        hi_bad = hi is not None and (value >= hi if m["hi_open"] else value > hi)
        if lo_bad or hi_bad:
            left = "(" if m["lo_open"] else "["
            right = ")" if m["hi_open"] else "]"
            lo_s = "-inf" if lo is None else f"{lo:g}"
            hi_s = "inf" if hi is None else f"{hi:g}"
            raise ConfigError(f"{key}: value {value!r} out of range; valid range "
                              f"{left}{lo_s}, {hi_s}{right}")


# --- presets -------------------------------------------------------------------------------

_VOC_R101: dict[str, Any] = {}  # the dataclass defaults are the paper's VOC DeepLab-v2 setting

# tiny-v1: the first embedded default, kept so that its results
# (docs/results.md#the-previous-default-tiny-v1) stay reproducible with --preset tiny-v1.
_TINY_V1: dict[str, Any] = {
    "data.dataset": "synthetic",
    "data.test_split": "test",
    "data.labeled_split": "128",
    "data.num_classes": 7,
    "data.crop_size": 48,
    "data.scale_min": 1.0,
    "data.scale_max": 1.0,
    "data.flip": True,
    "data.batch_size": 8,
    "data.batch_size_u": 8,
    "model.arch": "tiny",
    "model.width": 24,
    "model.fuse": "3x3",
    "model.feat_dim": 64,
    "method.bank_size": 64,
    "method.bank_ready": "min_fill",
    "method.bank_min_fill": 16,
    "method.max_anchors": 256,
    "method.mix": "cutmix",
    "method.strong_color": "permute",
    "method.weighting": "power",
    "method.warmup_iters": 400,
    "method.jitter_blur_per": "sample",
    "method.student_forward": "joint",
    "optim.iters": 2000,
    "optim.optimizer": "adamw",
    "optim.lr": 3e-3,
    "optim.head_lr_mult": 1.0,
    "optim.weight_decay": 1e-4,
    "run.eval_every": 200,
    "run.checkpoint_every": 200,
    "run.log_every": 50,
    "run.device": "cpu",
}

# tiny: tiny-v1 with ~3.8x fewer FLOPs per ctt step (1x1 fuse, width 16, half the anchors and
# bank) and a 200-iteration warm-up; tuned on seeds 100-102
# (docs/results.md#how-the-default-was-chosen).
_TINY: dict[str, Any] = {
    **_TINY_V1,
    "model.width": 16,
    "model.fuse": "1x1",
    "method.max_anchors": 128,
    "method.bank_size": 32,
    "method.warmup_iters": 200,
}

_VOC_V3PLUS: dict[str, Any] = {"model.arch": "deeplabv3plus"}

_CITYSCAPES: dict[str, Any] = {
    "data.dataset": "cityscapes",
    "data.labeled_split": "372",
    "data.num_classes": 19,
    "data.crop_size": 256,
    "data.crop_width": 512,
    "data.scale_min": 1.0,
    "data.scale_max": 1.0,
    "data.flip": False,  # the reference trains Cityscapes without flipping
    "data.batch_size": 2,
    "data.batch_size_u": 2,
    "data.eval_size": 512,
    "optim.iters": 16_000,
}

PRESETS: dict[str, CTTConfig] = {
    "tiny": CTTConfig.from_flat(_TINY),
    "tiny-v1": CTTConfig.from_flat(_TINY_V1),
    "voc-r101": CTTConfig.from_flat(_VOC_R101),
    "voc-r101-v3plus": CTTConfig.from_flat(_VOC_V3PLUS),
    "cityscapes-r101": CTTConfig.from_flat(_CITYSCAPES),
}


def get_preset(name: str) -> CTTConfig:
    """The named preset; unknown names raise :class:`ConfigError` listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; valid presets: "
                          f"{', '.join(PRESETS)}") from None


# --- ablation variants (the paper's table), each a set of overrides -------------------------

VARIANTS: dict[str, dict[str, Any]] = {
    "supervised": {"method.pairs": 1, "method.unsup": "none", "method.lambda_u": 0.0,
                   "method.lambda_h": 0.0, "method.lambda_l": 0.0},
    "mean_teacher": {"method.pairs": 1, "method.unsup": "self", "method.lambda_h": 0.0,
                     "method.lambda_l": 0.0},
    "dual_self": {"method.pairs": 2, "method.unsup": "self", "method.lambda_h": 0.0,
                  "method.lambda_l": 0.0},
    "cross": {"method.pairs": 2, "method.unsup": "cross", "method.lambda_h": 0.0,
              "method.lambda_l": 0.0},
    "cross_hc": {"method.pairs": 2, "method.unsup": "cross", "method.lambda_l": 0.0},
    "cross_lc": {"method.pairs": 2, "method.unsup": "cross", "method.lambda_h": 0.0},
    "ctt": {"method.pairs": 2, "method.unsup": "cross"},
}


def apply_variant(cfg: CTTConfig, variant: str) -> CTTConfig:
    """``cfg`` with the overrides of ``variant``; contrast weights left at ``cfg``'s values
    when the variant keeps them on."""
    try:
        overrides = VARIANTS[variant]
    except KeyError:
        raise ConfigError(f"unknown variant {variant!r}; valid variants: "
                          f"{', '.join(VARIANTS)}") from None
    return cfg.override(overrides)


def parse_set_args(items: list[str] | None) -> dict[str, str]:
    """``["method.lambda_h=0.2", ...]`` -> ``{"method.lambda_h": "0.2"}`` (values coerced later
    by :meth:`CTTConfig.from_flat`)."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r} "
                              "(e.g. --set method.lambda_h=0.2)")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


# --- settings that cannot do what they say --------------------------------------------------

_NO_UNSUP = "method.unsup='none' trains on labeled images only"
_NO_CONTRAST = ("both contrastive terms are off (method.lambda_h=0, and method.lambda_l=0 or "
                "one pair)")
_ONE_PAIR = "method.pairs=1 has no second student"


def inert_keys(cfg: CTTConfig) -> dict[str, str]:
    """Keys whose value cannot change what ``cfg`` trains, each mapped to the reason.

    Used for warnings (a ``--set`` of such a key is probably a slip) and by sweeps, which must
    not sample a parameter the variant ignores. Defaults set by presets are never reported:
    callers pass only the keys a user set."""
    m, d, mo = cfg.method, cfg.data, cfg.model
    flat = cfg.to_flat()
    out: dict[str, str] = {}

    def off(keys: tuple[str, ...], why: str) -> None:
        for k in keys:
            if k in flat:  # keys other sessions add or rename are simply skipped
                out.setdefault(k, why)

    bank = ("method.bank_size", "method.bank_ready", "method.bank_min_fill", "method.tau_bank",
            "method.max_anchors", "method.tau_high_conf")
    if m.unsup == "none":
        off(("method.tau_p", "method.weighting", "method.mix", "method.strong_color",
             "method.jitter_blur_per", "method.student_forward", "method.teacher_mode",
             "method.warmup_iters", "data.batch_size_u", "method.tau_h", "method.tau_l",
             "method.low_gate", *bank), _NO_UNSUP)
    low_on = m.lambda_l > 0 and m.pairs == 2
    if m.lambda_h == 0:
        off(("method.tau_h",), "method.lambda_h=0 switches the high-level contrast off")
    if not low_on:
        off(("method.tau_l", "method.low_gate"),
            "the low-level contrast is off (method.lambda_l=0 or one pair)")
    if m.lambda_h == 0 and not low_on:
        off(bank, _NO_CONTRAST)
    if m.pairs == 1:
        off(("model.pretrained_peer", "method.shared_aug"), _ONE_PAIR)
    if d.dataset != "cityscapes":
        off(("data.eval_size",), f"data.eval_size applies to Cityscapes only (data.dataset="
            f"{d.dataset!r})")
    else:
        off(("data.label_dir",), "data.label_dir applies to VOC layouts only")
    if mo.arch != "tiny":
        off(("model.width", "model.fuse"),
            f"model.width and model.fuse shape the tiny network only (model.arch={mo.arch!r})")
    else:
        off(("model.depth", "model.resnet_style", "model.output_stride"),
            "model.arch='tiny' has no ResNet backbone")
    if mo.arch == "deeplabv2":
        off(("model.output_stride",), "DeepLab-v2 always has output stride 8")
    return out


def check_semantics(cfg: CTTConfig, variant: str | None = None, *, study: bool = False,
                    set_keys: tuple[str, ...] | list[str] | set[str] = (),
                    local: bool = False) -> list[str]:
    """Refuse settings whose run would silently differ from what the config records; return
    warnings (one line each) where the intent is only ambiguous.

    Call it after the variant and every override are applied, before anything is written or
    Ray starts. Library constructors do not call it: benchmarks and tests build configs that
    an entry point would refuse (e.g. a warm-up longer than the run, to time warm-up steps).

    Args:
        cfg: the resolved config.
        variant: named in messages.
        study: the config runs as a study trial, which checkpoints only when it reports an
            evaluation (``ctt.tune.trainable``), so ``run.checkpoint_every`` must be a multiple
            of ``run.eval_every``. ``ctt.train`` checkpoints on its own schedule.
        set_keys: keys the user set explicitly; those that cannot act are warned about.
        local: the run uses this machine's devices (``run.device=cuda`` needs CUDA here).
    Raises:
        ConfigError: a term that cannot run has a weight > 0; a semi-supervised run that would
            end inside its supervised warm-up; (study) rare checkpoints.
        DeviceError: (local) ``run.device=cuda`` without a CUDA device.
    """
    m, o, r = cfg.method, cfg.optim, cfg.run
    where = f" (variant {variant})" if variant else ""
    if m.unsup == "none":
        on = [f"method.{k}={getattr(m, k):g}" for k in ("lambda_u", "lambda_h", "lambda_l")
              if getattr(m, k) > 0]
        if on:
            raise ConfigError(
                f"{', '.join(on)} cannot act with method.unsup='none'{where}: a supervised run "
                "trains on labeled images only and runs no unsupervised or contrastive term; "
                "set these weights to 0 (the supervised variant does) or choose a "
                "semi-supervised variant")
    if m.lambda_l > 0 and m.pairs == 1:
        raise ConfigError(
            f"method.lambda_l={m.lambda_l:g} cannot act with method.pairs=1{where}: the "
            "low-level contrast compares each student with its peer and one pair has none; "
            "set method.lambda_l=0 or use a two-pair variant (cross_lc, ctt)")
    if m.unsup != "none" and o.iters <= m.warmup_iters:
        raise ConfigError(
            f"optim.iters={o.iters} <= method.warmup_iters={m.warmup_iters}{where}: the run "
            "would end inside its supervised warm-up and never train the semi-supervised "
            f"terms; raise optim.iters (--iters) above {m.warmup_iters} or lower "
            f"method.warmup_iters (e.g. --set method.warmup_iters={o.iters // 5})")
    if study and r.checkpoint_every % r.eval_every:
        every = math.lcm(r.checkpoint_every, r.eval_every)
        fit = r.eval_every * max(1, round(r.checkpoint_every / r.eval_every))
        raise ConfigError(
            f"run.checkpoint_every={r.checkpoint_every} is not a multiple of "
            f"run.eval_every={r.eval_every}: a study trial saves a checkpoint only when it "
            f"reports an evaluation, so checkpoints would land every {every} iterations; set "
            f"run.checkpoint_every to a multiple of run.eval_every (e.g. {fit})")
    if local and r.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            from ctt.errors import DeviceError

            raise DeviceError("run.device='cuda' but torch sees no CUDA device on this machine; "
                              "use --device cpu (or auto)")
    warnings = []
    inert = inert_keys(cfg)
    flat = cfg.to_flat()
    for key in set_keys:
        if key in inert:
            warnings.append(f"{key}={flat[key]} has no effect{where}: {inert[key]}")
    low_on = m.lambda_l > 0 and m.pairs == 2
    if m.unsup != "none" and m.lambda_u == 0 and m.lambda_h == 0 and not low_on:
        warnings.append(f"method.unsup={m.unsup!r} with every unsupervised weight 0{where} "
                        "trains like the supervised variant at a higher cost; use --variant "
                        "supervised, or set method.lambda_u > 0")
    return warnings
