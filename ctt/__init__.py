"""Cross Teacher Training (CTT) for semi-supervised semantic segmentation.

The method lives in this package and needs only torch/torchvision/numpy; the study system in
:mod:`ctt.tune` is the only part that imports Ray and Optuna.
"""

__version__ = "0.1.0"
