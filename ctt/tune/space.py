"""Search-space conventions shared by the trainable, the callback and the studies.

A sweep may sample a config key through a transformed parameter: ``"1-method.ema_decay"``
holds ``1 - decay``, so a log-uniform domain on it samples decays 0.9 ... 0.9999 evenly in
"number of nines". :func:`resolve_config` turns such keys back into the real key, so trials,
Parquet and HParams always show the value the run actually used.
"""

from __future__ import annotations

from typing import Any

ONE_MINUS = "1-"


def resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    """Replace every ``"1-<key>": x`` by ``"<key>": 1 - x`` (order otherwise kept)."""
    out = {k: v for k, v in config.items() if not k.startswith(ONE_MINUS)}
    for k, v in config.items():
        if k.startswith(ONE_MINUS):
            out[k[len(ONE_MINUS):]] = 1.0 - float(v)
    return out
