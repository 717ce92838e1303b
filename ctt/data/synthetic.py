"""A synthetic segmentation dataset written in the exact Pascal VOC 2012 layout.

The embedded default of ctt-studies must train on 2 CPU cores in minutes, yet leave room for
semi-supervision to win. This module writes such a task to disk so that the ordinary VOC reader
(`ctt.data.voc`) reads it unchanged:

    <root>/JPEGImages/<id>.jpg                 RGB, JPEG quality 95 (4:4:4 chroma: at 48 px,
                                               4:2:0 would smear the 2-colour textures)
    <root>/SegmentationClass/<id>.png          "P"-mode PNG, VOC palette, 255 = ignore
    <root>/ImageSets/Segmentation/{train,val,test}.txt   bare ids, one per line
    <root>/splits/<count>/labeled.txt          "JPEGImages/<id>.jpg SegmentationClass/<id>.png"
    <root>/splits/<count>/unlabeled.txt        the rest of train, same format
    <root>/splits/all/labeled.txt              every train image (the "all labels" upper bound)
    <root>/.ctt_synthetic.json                 parameters; written last = the tree is complete

Ids are ``train_000000``, ``val_000000``, ``test_000000``. ``test`` is held out: sweeps select
on ``val`` and report on ``test``. Labeled splits are nested (the 32 include the 16).

The task (defaults, and why; sized by a prototype on a 2-core CPU, then tuned as
docs/results.md#how-the-default-was-chosen describes):
- 48 x 48 px, 1,000 train / 200 val / 200 test, 7 classes (background + 6 objects): small
  enough for ~0.04 s per supervised step of a 0.3 M-parameter net on one core, large enough for
  shapes and textures to be resolvable (texture periods >= 3.5 px; 6 px by default).
- Each object class is a (shape, texture) pair: disk/stripes, square/checks, triangle/dots,
  ring/waves, bar/grid, cross/concentric rings; either cue identifies the class. Textures are
  drawn in the object's own rotated frame with a period of about 6 px (size / 8). 0-2
  *distractor* shapes per image, labelled background, carry no class cue: other shapes
  (half-disk, L, flower) in plain or noise fills. (v1 and v2 used distractors that shared one
  or both cues with a class, and 4 px textures; from 64 labels a tiny net then learned class
  identity at chance level, so pseudo-labels carried nothing and every semi-supervised variant
  lost to supervised. v3 keeps 64 labels far from the all-labels ceiling: 27 vs 62 mIoU.)
- Object colours (two per object, mixed by its texture) come from ONE shared palette for all
  classes and distractors, so colour carries no class information; colour jitter and channel
  permutation are then label-safe strong augmentations.
- 2-4 objects per image with random scale (radius 16-30 % of the side), rotation, position
  (partly outside the frame is allowed, as in VOC), shuffled with the distractors into one paint
  order (later shapes occlude earlier ones); a low-contrast background of grey plus soft colour
  blobs; global brightness gain/offset and Gaussian pixel noise.
- Object pixels that touch (4-neighbourhood) a pixel of another instance or of background are
  labelled 255: a 1 px ignore border (2 px between two touching objects), like VOC's outlines.
  Distractors are background and get no outline of their own.
These choices make a few labels insufficient while more data helps (tiny net, `tiny` preset
without scale jitter, seed 100: 26.6 val mIoU from 64 labels, 61.7 from all 1,000), which is the
gap semi-supervision can close.

Determinism: every image has its own ``numpy.random.Generator`` seeded by (seed, split, index),
so the same seed gives byte-identical PNGs and identical JPEG pixels whatever the generation
order, and a val/test image does not change when ``num_train`` does.

CLI: ``python -m ctt.data.synthetic --root DIR [--seed S --num-train N --num-val M --num-test K
--size PX --num-classes C --label-counts 16,32,64,128 --force]``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ctt.errors import DataRootError, UserError, guarded
from ctt.fileio import atomic_write_text, is_atomic_temp

__all__ = [
    "CLASS_NAMES",
    "DEFAULTS",
    "MARKER",
    "VOC_PALETTE",
    "default_root",
    "ensure",
    "generate",
    "ignore_border",
    "main",
    "read_marker",
    "render_sample",
    "voc_palette",
]

MARKER = ".ctt_synthetic.json"
_LOCK = ".ctt_synthetic.lock"
# Written first and removed last: a directory holding it is an interrupted generation of ours,
# safe to regenerate. A non-empty directory with neither file is someone else's: never touched.
_PARTIAL = ".ctt_synthetic.partial"
# Bump when the drawing changes: it is part of the marker and of the cache-directory hash, so a
# stale cache is never mistaken for the current task.
_VERSION = 3
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_OUR_DIRS = ("JPEGImages", "SegmentationClass", "ImageSets", "splits")
_ID_RE = re.compile(r"^(train|val|test)_\d{6,}\.(jpg|png)$")

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "num_train": 1000,
    "num_val": 200,
    "num_test": 200,
    "size": 48,
    "num_classes": 7,
    "label_counts": (16, 32, 64, 128),
}

# Shapes 0-5 and textures 0-5 belong to object classes 1-6 (class k = shape k-1 + texture k-1);
# the rest exist only so distractors can be "almost a class".
_SHAPES = ("disk", "square", "triangle", "ring", "bar", "cross", "half_disk", "ell", "flower")
_TEXTURES = ("stripes", "checks", "dots", "waves", "grid", "rings", "plain", "noise")
_NUM_OBJECT_KINDS = 6
CLASS_NAMES = ("background",) + tuple(
    f"{_SHAPES[k]}/{_TEXTURES[k]}" for k in range(_NUM_OBJECT_KINDS)
)


def voc_palette() -> list[int]:
    """The 256-entry Pascal VOC colour map as 768 ints (r0, g0, b0, r1, ...).

    Entry i spreads the bits of i over the channels (bit 0 -> red, 1 -> green, 2 -> blue, then
    the next three bits one level lower), so 1 = (128, 0, 0) and 255 = (224, 224, 192).
    """
    palette: list[int] = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= (c & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


VOC_PALETTE: list[int] = voc_palette()


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


# One palette for every object and distractor: 10 hues, alternating bright/dark so that any two
# entries differ in hue or in brightness and the two colours of a texture stay distinguishable.
_OBJECT_COLOURS = np.array(
    [_hsv_to_rgb(k / 10, 0.75, 0.95 if k % 2 == 0 else 0.6) for k in range(10)]
)  # [10, 3] in [0, 1]


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, each [size, size] float64 (y down, x right)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    ys.setflags(write=False)
    xs.setflags(write=False)
    return ys, xs


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of points (u, v) in the object frame (unit = object radius): bool, same shape."""
    name = _SHAPES[shape]
    au, av = np.abs(u), np.abs(v)
    if name == "disk":
        return u * u + v * v <= 1.0
    if name == "square":
        return np.maximum(au, av) <= 0.82
    if name == "triangle":
        # Equilateral: three half-planes with outward normals 120 degrees apart, inradius 0.62.
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            a = -np.pi / 2 + 2 * np.pi * k / 3
            inside &= u * np.cos(a) + v * np.sin(a) <= 0.62
        return inside
    if name == "ring":
        rho2 = u * u + v * v
        return (rho2 <= 1.0) & (rho2 >= 0.5**2)
    if name == "bar":
        return (au <= 1.1) & (av <= 0.38)
    if name == "cross":
        return ((au <= 1.0) & (av <= 0.3)) | ((au <= 0.3) & (av <= 1.0))
    if name == "half_disk":
        return (u * u + v * v <= 1.0) & (v >= -0.1)
    if name == "ell":
        return ((au <= 0.9) & (v >= 0.35) & (v <= 0.9)) | ((u >= -0.9) & (u <= -0.35) & (av <= 0.9))
    if name == "flower":
        return np.hypot(u, v) <= 0.62 + 0.32 * np.cos(5 * np.arctan2(v, u))
    raise AssertionError(name)


def _texture(
    texture: int, tu: np.ndarray, tv: np.ndarray, period: float, rng: np.random.Generator
) -> np.ndarray:
    """Texture value in [0, 1] at points (tu, tv) in pixels of the object's rotated frame."""
    name = _TEXTURES[texture]
    # A random phase/offset so the texture is not locked to the object's centre.
    ou, ov = rng.uniform(0, period, size=2)
    su, sv = (tu + ou) / period, (tv + ov) / period
    if name == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * su)
    if name == "checks":
        return ((np.floor(su / 0.6) + np.floor(sv / 0.6)) % 2).astype(np.float64)
    if name == "dots":
        fu, fv = su / 1.1 % 1.0 - 0.5, sv / 1.1 % 1.0 - 0.5
        return (fu * fu + fv * fv <= 0.3**2).astype(np.float64)
    if name == "waves":
        return 0.5 + 0.5 * np.sin(2 * np.pi * (su + 0.35 * np.sin(np.pi * sv)))
    if name == "grid":
        fu, fv = np.abs(su % 1.0 - 0.5), np.abs(sv % 1.0 - 0.5)
        return (np.maximum(fu, fv) >= 0.375).astype(np.float64)
    if name == "rings":
        return 0.5 + 0.5 * np.sin(2 * np.pi * np.hypot(tu, tv) / period + 2 * np.pi * ou / period)
    if name == "plain":
        return np.zeros(tu.shape)
    if name == "noise":
        return (rng.random(tu.shape) < 0.5).astype(np.float64)
    raise AssertionError(name)


def ignore_border(instances: np.ndarray) -> np.ndarray:
    """Pixels of an object instance whose 4-neighbour belongs to another instance or background.

    instances: [H, W] int, 0 = background, k > 0 = the k-th painted object.
    Returns [H, W] bool. The image edge is not a border (VOC does not outline truncated objects
    at the frame).
    """
    padded = np.pad(instances, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    differs = (
        (padded[:-2, 1:-1] != centre)
        | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre)
        | (padded[1:-1, 2:] != centre)
    )
    return differs & (centre > 0)


def _check_render_args(size: int, num_classes: int) -> None:
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16 pixels, got {size!r}")
    if not isinstance(num_classes, int) or not 2 <= num_classes <= 1 + _NUM_OBJECT_KINDS:
        raise ValueError(
            f"num_classes must be an int in [2, {1 + _NUM_OBJECT_KINDS}] (it includes background; "
            f"there are {_NUM_OBJECT_KINDS} object kinds), got {num_classes!r}"
        )


def render_sample(
    seed: int, split: str, index: int, *, size: int = 48, num_classes: int = 7
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image and its label map, a pure function of its arguments.

    Returns (image uint8 [size, size, 3] RGB, label uint8 [size, size]) with label values in
    [0, num_classes) or 255 (ignore border). This is exactly what `generate` writes, before JPEG.
    """
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of {sorted(_SPLIT_CODE)}, got {split!r}")
    _check_render_args(size, num_classes)
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    ys, xs = _grid(size)

    # Background: grey with a faint tint, plus soft low-contrast colour blobs.
    image = np.empty((size, size, 3))
    image[:] = rng.uniform(0.35, 0.65) + rng.uniform(-0.05, 0.05, size=3)
    for _ in range(rng.integers(4, 9)):
        cy, cx = rng.uniform(0, size, size=2)
        sigma = rng.uniform(0.05, 0.25) * size
        blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2))
        image += blob[..., None] * rng.uniform(-0.15, 0.15, size=3)

    num_objects = int(rng.integers(2, 5))
    num_distractors = int(rng.integers(0, 3))
    # A distractor is a non-class shape in a non-class fill: background that is not blank, but
    # never "almost a class" (see the module docstring for why v1/v2 did that and stopped).
    distractor_pairs = [
        (s, t)
        for s in range(_NUM_OBJECT_KINDS, len(_SHAPES))
        for t in range(_NUM_OBJECT_KINDS, len(_TEXTURES))
    ]
    # (shape, texture, class) in paint order; distractors are class 0.
    items: list[tuple[int, int, int]] = []
    for _ in range(num_objects):
        cls = int(rng.integers(1, num_classes))
        items.append((cls - 1, cls - 1, cls))
    for _ in range(num_distractors):
        s, t = distractor_pairs[int(rng.integers(len(distractor_pairs)))]
        items.append((s, t, 0))
    items = [items[i] for i in rng.permutation(len(items))]

    instances = np.zeros((size, size), dtype=np.int32)
    instance_class = [0]
    base_period = max(3.5, size / 8)
    for shape, texture, cls in items:
        cy, cx = rng.uniform(0.12, 0.88, size=2) * size
        radius = rng.uniform(0.16, 0.30) * size
        theta = rng.uniform(0, 2 * np.pi)
        cos, sin = np.cos(theta), np.sin(theta)
        # Rotate into the object's frame, in pixels; the texture lives in this frame.
        tu = cos * (xs - cx) + sin * (ys - cy)
        tv = -sin * (xs - cx) + cos * (ys - cy)
        mask = _shape_mask(shape, tu / radius, tv / radius)
        period = base_period * rng.uniform(0.9, 1.25)
        colour_a, colour_b = _OBJECT_COLOURS[rng.choice(len(_OBJECT_COLOURS), 2, replace=False)]
        shading = rng.uniform(-0.12, 0.12)  # a gentle light gradient across the object
        t = _texture(texture, tu[mask], tv[mask], period, rng)[:, None]  # [n, 1]
        light = 1.0 + shading * (tu[mask] / radius)[:, None]
        image[mask] = (colour_a * (1.0 - t) + colour_b * t) * light
        if cls > 0:
            instance_class.append(cls)
            instances[mask] = len(instance_class) - 1
        else:
            instances[mask] = 0

    image = image * rng.uniform(0.8, 1.15) + rng.uniform(-0.06, 0.06)
    image += rng.normal(0.0, rng.uniform(0.01, 0.035), size=image.shape)
    image_u8 = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)

    label = np.asarray(instance_class, dtype=np.uint8)[instances]
    label[ignore_border(instances)] = 255
    return image_u8, label


def _normalise_params(params: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown parameter(s) {unknown}; valid: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **params}
    for key in ("seed", "num_train", "num_val", "num_test", "size", "num_classes"):
        if isinstance(p[key], bool) or not isinstance(p[key], (int, np.integer)):
            raise TypeError(f"{key} must be an int, got {p[key]!r}")
        p[key] = int(p[key])
    for key in ("num_train", "num_val", "num_test"):
        if p[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {p[key]}")
    _check_render_args(p["size"], p["num_classes"])
    counts = sorted({int(c) for c in p["label_counts"]})
    bad = [c for c in counts if not 1 <= c <= p["num_train"]]
    if bad:
        raise ValueError(
            f"label_counts {bad} must lie in [1, num_train={p['num_train']}]; "
            "lower them or raise num_train"
        )
    p["label_counts"] = counts  # a list: what the JSON marker holds, so comparisons are exact
    return p


def default_root(**params: Any) -> Path:
    """The cache directory for these parameters: ``$CTT_CACHE`` (else ``~/.cache/ctt``) /
    ``synthetic-voc-<10 hex digits of a hash of the parameters and generator version>``."""
    p = _normalise_params(params)
    digest = hashlib.sha256(
        json.dumps({"version": _VERSION, **p}, sort_keys=True).encode()
    ).hexdigest()[:10]
    base = os.environ.get("CTT_CACHE") or os.path.join("~", ".cache", "ctt")
    return Path(base).expanduser() / f"synthetic-voc-{digest}"


def _check_safe_to_write(root: Path) -> None:
    """Refuse to overwrite anything that is not a synthetic dataset (e.g. a real VOC root)."""
    if not root.is_dir():
        return
    names = {entry.name for entry in root.iterdir()} - {_LOCK}
    if names and not names & {MARKER, _PARTIAL}:
        raise FileExistsError(
            f"refusing to generate into {root}: it is not empty and holds no synthetic dataset "
            f"(found {', '.join(sorted(names)[:5])}); pass an empty or new directory as root"
        )
    for entry in root.iterdir():
        if entry.name in (MARKER, _LOCK, _PARTIAL) or is_atomic_temp(entry.name, MARKER):
            continue
        if entry.name not in _OUR_DIRS:
            raise FileExistsError(
                f"refusing to generate into {root}: it holds {entry.name!r}, which the synthetic "
                "generator did not write; pass an empty or new directory as root"
            )
    for sub in ("JPEGImages", "SegmentationClass"):
        d = root / sub
        if d.is_dir():
            for entry in d.iterdir():
                if not _ID_RE.match(entry.name):
                    raise FileExistsError(
                        f"refusing to generate into {root}: {d / entry.name} is not a synthetic "
                        "image; pass an empty or new directory as root"
                    )


def _pair(image_id: str) -> str:
    return f"JPEGImages/{image_id}.jpg SegmentationClass/{image_id}.png"


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def generate(
    root: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_train: int = 1000,
    num_val: int = 200,
    num_test: int = 200,
    size: int = 48,
    num_classes: int = 7,
    label_counts: Sequence[int] = (16, 32, 64, 128),
) -> Path:
    """Write the dataset under root (replacing an earlier synthetic dataset there) and return it.

    num_classes includes background. label_counts are the labeled-split sizes (nested, each
    <= num_train). The marker file is written last, so an interrupted run leaves no marker and
    `ensure` regenerates. Raises FileExistsError if root holds files this generator did not write.
    """
    start = time.perf_counter()
    p = _normalise_params(
        {
            "seed": seed,
            "num_train": num_train,
            "num_val": num_val,
            "num_test": num_test,
            "size": size,
            "num_classes": num_classes,
            "label_counts": label_counts,
        }
    )
    root = Path(root)
    _check_safe_to_write(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / _PARTIAL).touch()
    (root / MARKER).unlink(missing_ok=True)
    for sub in _OUR_DIRS:
        shutil.rmtree(root / sub, ignore_errors=True)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()

    ids: dict[str, list[str]] = {}
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        ids[split] = [f"{split}_{i:06d}" for i in range(count)]
        for i, image_id in enumerate(ids[split]):
            image, label = render_sample(p["seed"], split, i, size=size, num_classes=num_classes)
            Image.fromarray(image, "RGB").save(
                root / "JPEGImages" / f"{image_id}.jpg", quality=95, subsampling=0
            )
            png = Image.frombytes("P", (size, size), label.tobytes())
            png.putpalette(VOC_PALETTE)
            png.save(root / "SegmentationClass" / f"{image_id}.png")
        _write_lines(root / "ImageSets" / "Segmentation" / f"{split}.txt", ids[split])

    # One shuffle of train; every labeled split is a prefix of it, hence nested.
    order = np.random.default_rng([p["seed"], 1000]).permutation(num_train)
    for count in p["label_counts"]:
        chosen = set(order[:count].tolist())
        labeled = [ids["train"][i] for i in range(num_train) if i in chosen]
        unlabeled = [ids["train"][i] for i in range(num_train) if i not in chosen]
        _write_lines(root / "splits" / str(count) / "labeled.txt", [_pair(x) for x in labeled])
        _write_lines(root / "splits" / str(count) / "unlabeled.txt", [_pair(x) for x in unlabeled])
    _write_lines(root / "splits" / "all" / "labeled.txt", [_pair(x) for x in ids["train"]])

    marker = {
        "generator": "ctt.data.synthetic",
        "version": _VERSION,
        "params": p,
        "counts": {split: len(v) for split, v in ids.items()},
        "class_names": list(CLASS_NAMES[:num_classes]),
        "seconds": round(time.perf_counter() - start, 3),
    }
    atomic_write_text(root / MARKER, json.dumps(marker, indent=2, sort_keys=True) + "\n")
    (root / _PARTIAL).unlink()
    return root


def read_marker(root: Path) -> dict[str, Any]:
    path = root / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataRootError(f"cannot read the synthetic dataset marker {path} ({err}); "
                            f"regenerate it with python -m ctt.data.synthetic --root {root} "
                            "--force") from err


def _check_marker(root: Path, params: dict[str, Any]) -> None:
    marker = read_marker(root)
    have = {"version": marker.get("version"), **marker.get("params", {})}
    want = {"version": _VERSION, **params}
    diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
    if diff:
        detail = ", ".join(f"{k}: on disk {a!r}, requested {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{root} already holds a synthetic dataset with other parameters ({detail}). "
            f"Delete {root}, pass another root, or root=None for a cache directory named by "
            "the parameters."
        )


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise generation into one root across processes (e.g. parallel trials)."""
    try:
        import fcntl
    except ImportError:  # non-POSIX: no lock, generation is still correct for a single process
        yield
        return
    with open(root / _LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure(root: str | os.PathLike[str] | None = None, **params: Any) -> Path:
    """Return a complete dataset with these parameters, generating it only if needed.

    root=None uses `default_root(**params)`. An existing complete dataset (marker present) is
    reused untouched; one with a marker for other parameters raises ValueError naming root; a
    tree without a marker (interrupted) is regenerated. params: the keyword arguments of
    `generate`.
    """
    p = _normalise_params(params)
    path = default_root(**p) if root is None else Path(root)
    if (path / MARKER).exists():
        _check_marker(path, p)
        return path
    _check_safe_to_write(path)  # before the lock file: refuse without leaving a trace
    path.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        if (path / MARKER).exists():  # another process finished while we waited
            _check_marker(path, p)
            return path
        return generate(path, **p)


@guarded
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints the root, the split sizes and the elapsed time. Bad parameters,
    a foreign or unwritable --root are one ``error:`` line and exit code 2."""
    parser = argparse.ArgumentParser(
        prog="python -m ctt.data.synthetic",
        description="Write (or reuse) the synthetic VOC-layout segmentation dataset.",
    )
    parser.add_argument("--root", default=None, help="output directory (default: cache dir)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--num-train", type=int, default=DEFAULTS["num_train"])
    parser.add_argument("--num-val", type=int, default=DEFAULTS["num_val"])
    parser.add_argument("--num-test", type=int, default=DEFAULTS["num_test"])
    parser.add_argument("--size", type=int, default=DEFAULTS["size"])
    parser.add_argument("--num-classes", type=int, default=DEFAULTS["num_classes"])
    parser.add_argument(
        "--label-counts",
        default=",".join(map(str, DEFAULTS["label_counts"])),
        help="comma-separated labeled-split sizes (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="regenerate even if complete")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    args = parser.parse_args(argv)
    try:
        counts = tuple(int(c) for c in args.label_counts.split(",") if c.strip())
    except ValueError:
        parser.error(f"--label-counts must be comma-separated ints, got {args.label_counts!r}")
    params = {
        "seed": args.seed,
        "num_train": args.num_train,
        "num_val": args.num_val,
        "num_test": args.num_test,
        "size": args.size,
        "num_classes": args.num_classes,
        "label_counts": counts,
    }
    start = time.perf_counter()
    try:
        if args.force:
            root = generate(args.root or default_root(**params), **params)
        else:
            root = ensure(args.root, **params)
    except UserError:
        raise
    except FileExistsError as err:
        if err.errno is not None:  # the OS's: a file stands where a directory must go
            raise UserError(f"cannot generate into {err.filename or args.root}: it is a file, "
                            "not a directory; choose another --root") from err
        raise UserError(str(err)) from err  # ours: a directory the generator did not write
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from err
    except OSError as err:  # unwritable or full --root
        where = err.filename or args.root or "the cache directory"
        raise UserError(f"cannot write the synthetic dataset ({where}): "
                        f"{err.strerror or err}; choose a writable --root") from err
    elapsed = time.perf_counter() - start
    marker = read_marker(root)
    sizes = marker["counts"]
    print(f"root: {root}")
    print(
        f"train {sizes['train']}  val {sizes['val']}  test {sizes['test']}  "
        f"size {params['size']} px  classes {params['num_classes']}  "
        f"labeled splits {','.join(map(str, marker['params']['label_counts']))},all"
    )
    print(f"elapsed: {elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
