"""Search spaces: the CTT sweep space and the conventions the trainable, the callback and the
studies share.

A sweep may sample a config key through a transformed parameter: ``"1-method.ema_decay"``
holds ``1 - decay``, so a log-uniform domain on it samples decays 0.9 ... 0.9999 evenly in
"number of nines". :func:`resolve_one_minus` turns such keys back into the real key, so trials,
Parquet and HParams always show the value the run actually used.
"""

from __future__ import annotations

from typing import Any

from ctt.config import VARIANTS, ConfigError, CTTConfig, apply_variant, inert_keys

ONE_MINUS = "1-"


def ctt_space() -> dict[str, Any]:
    """The CTT hyperparameters the sweeps sample: flat config key -> Tune domain (fresh objects
    on every call). EMA decay is sampled as ``1 - decay`` on a log scale."""
    from ray import tune

    return {
        "1-method.ema_decay": tune.loguniform(1e-4, 0.1),  # decay 0.9 ... 0.9999
        "method.tau_h": tune.loguniform(0.05, 0.5),
        "method.tau_l": tune.loguniform(0.1, 1.0),
        "method.lambda_u": tune.uniform(0.25, 2.0),
        "method.lambda_h": tune.loguniform(0.01, 1.0),
        "method.lambda_l": tune.loguniform(0.01, 1.0),
        "method.tau_p": tune.uniform(0.7, 0.99),
    }


def contrast_space() -> dict[str, Any]:
    """:func:`ctt_space` with the EMA decay fixed (the preset's): the contrast temperatures
    and loss weights, the unsupervised weight and the pseudo-label threshold. None of them is
    read during the supervised warm-up, so a sweep over it forks one shared warm-up
    (:func:`ctt.tune.sweep.sweep_warmup_plan`)."""
    return {k: v for k, v in ctt_space().items() if k != ONE_MINUS + "method.ema_decay"}


def variant_space(space: dict[str, Any], base: CTTConfig, variant: str) -> dict[str, Any]:
    """``space`` without the keys ``variant`` fixes (``VARIANTS``) or ignores
    (:func:`ctt.config.inert_keys`), e.g. the contrast weights and temperatures of a one-pair
    variant: sampling them would record values that never acted. Prints a note on what was
    left out; raises ConfigError when nothing is left to sample."""
    cfg = apply_variant(base, variant)
    fixed = set(VARIANTS[variant]) | set(inert_keys(cfg))
    if cfg.method.unsup == "none":  # the EMA decay moves only the teacher; `miou` is students'
        fixed.add("method.ema_decay")
    dropped = [k for k in space if k.removeprefix(ONE_MINUS) in fixed]
    kept = {k: v for k, v in space.items() if k not in dropped}
    if not kept:
        raise ConfigError(f"variant {variant!r} fixes or ignores every swept parameter "
                          f"({', '.join(space)}): choose a semi-supervised variant")
    if dropped:
        print(f"note: variant {variant} fixes or ignores {', '.join(dropped)}; not sampled",
              flush=True)
    return kept


def resolve_one_minus(config: dict[str, Any]) -> dict[str, Any]:
    """Replace every ``"1-<key>": x`` by ``"<key>": 1 - x`` (order otherwise kept)."""
    out = {k: v for k, v in config.items() if not k.startswith(ONE_MINUS)}
    for k, v in config.items():
        if k.startswith(ONE_MINUS):
            out[k[len(ONE_MINUS):]] = 1.0 - float(v)
    return out
