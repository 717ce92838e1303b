"""TensorBoard's HParams tab for a study: one session per trial, columns in the study's order.

Every trial (finished, pruned or errored) gets one session with the same columns, in the
study's order (:func:`hparams_columns`): an ablation's ``variant``, ``seed``, ``status``
(TERMINATED, PRUNED or ERROR, with checkbox filters); a sweep's swept parameters (as the run
used them) before ``status``, ``variant``, ``seed``; then the rest of the flat config by name.
Left out: internal keys (any ``_``-prefixed one, such as ``_fork_from``, a checkpoint path, and
``_until``) and ``run.seed`` (= ``seed``).
How the plugin orders columns (tensorboard 2.x): the experiment proto of an arbitrary run,
sorted by (``differs`` first, then ``name``); the dashboard shows the first five. So the
study's own columns are marked ``differs`` and named with their rank (``"00 variant"``), and
each column's ``display_name`` is the plain key, which is all the table and the CSV show.
Metrics ``miou_best`` and ``miou_final``, written only where measured: a finished trial has
both; a pruned trial only ``miou_best`` (the best it reached before it was stopped, which is
what a pruner compares; its last value is no final); an errored trial none. The plugin treats
a missing metric as absent (blank cell, sorted and filtered as missing), whereas a made-up 0.0
would rank as a real score and NaN reaches the dashboard as the string "NaN" (protobuf's JSON
form of a NaN double). The session lives in its own event file (``*.hparams``) in the trial's
run directory, so it can be replaced wholesale (the plugin
keeps the first metadata it sees per tag and run).
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["HPARAMS_METRICS", "HPARAMS_SUFFIX", "STATUSES", "hparams_columns",
           "write_hparams_session"]

HPARAMS_SUFFIX = ".hparams"
_STATUS_TO_SESSION = {"TERMINATED": "STATUS_SUCCESS", "PRUNED": "STATUS_SUCCESS",
                      "ERROR": "STATUS_FAILURE"}


def _remove_hparams_files(logdir: str) -> None:
    for path in glob.glob(os.path.join(glob.escape(logdir), f"*{HPARAMS_SUFFIX}")):
        os.remove(path)


def _hparam_value(v: Any) -> bool | int | float | str:
    if v is None:
        return "none"
    if isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


HPARAMS_METRICS = ("miou_best", "miou_final")
_DIFFERS_TRUE = bytes([7 << 3 | 0, 1])
STATUSES = ("TERMINATED", "PRUNED", "ERROR")


def hparams_columns(config: dict[str, Any], variant: str, seed: Any, status: str,
                    swept: Sequence[str] = ()) -> tuple[dict[str, Any], list[str]]:
    """The HParams columns of one trial, in display order, and the leading ones.

    Returns ``(columns, lead)``: ``columns`` maps key -> value, the study's own columns
    first (``lead``), then every other config key by name, leaving out ``_``-prefixed
    (internal) keys, ``variant``/``seed`` and ``run.seed``. ``lead`` is ``variant, seed,
    status`` for an ablation; for a sweep (``swept`` keys the config has) the swept keys come
    before ``status, variant, seed``, because TensorBoard's dashboard ticks only the first
    five columns by default (checked in a browser, TensorBoard 2.21) and a sweep's search
    holds variant and seed fixed: the five visible columns are then the ones that differ.
    """
    swept_here = [k for k in swept if k in config]
    lead = ([*swept_here, "status", "variant", "seed"] if swept_here
            else ["variant", "seed", "status"])
    own = {"variant": variant, "seed": seed, "status": status}
    columns: dict[str, Any] = {k: own[k] if k in own else config[k] for k in lead}
    columns.update({k: config[k] for k in sorted(config)
                    if k not in columns and not k.startswith("_") and k != "run.seed"})
    return columns, lead


def write_hparams_session(logdir: str, hparams: dict[str, Any], metrics: dict[str, float],
                          status: str, step: int, lead: Sequence[str] = (),
                          domains: dict[str, Sequence[Any]] | None = None) -> None:
    """Replace the trial's HParams session: experiment + session start/end + metric scalars.

    ``hparams`` in display order; ``lead`` are the keys shown first (marked ``differs`` and
    named ``"<rank> <key>"`` so that the plugin's (differs, name) sort keeps this order; every
    column's display name is its key). ``domains`` gives the discrete values of a column (a
    checkbox filter; it must list every value of the study, since the plugin takes the
    experiment of one run for all). ``metrics`` holds only measured values (see module doc):
    its keys are written as scalars, while the experiment lists every name in
    ``HPARAMS_METRICS``, so each run's experiment is the same. Written to its own
    ``*.hparams`` event file in ``logdir`` (the trial's run directory, not a timestamped
    subdirectory as ``SummaryWriter.add_hparams`` would use).
    """
    from google.protobuf.struct_pb2 import ListValue
    from tensorboardX import SummaryWriter
    from tensorboardX.proto.api_pb2 import (
        DataType,
        Experiment,
        HParamInfo,
        MetricInfo,
        MetricName,
        Status,
    )
    from tensorboardX.proto.plugin_hparams_pb2 import (
        HParamsPluginData,
        SessionEndInfo,
        SessionStartInfo,
    )
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

    _remove_hparams_files(logdir)
    rank = {k: i for i, k in enumerate(lead)}
    digits = max(2, len(str(len(lead))))  # "00 variant" ... sorts by rank as text
    ssi = SessionStartInfo()
    infos = []
    for key, raw in hparams.items():
        value = _hparam_value(raw)
        name = f"{rank[key]:0{digits}d} {key}" if key in rank else key
        if isinstance(value, str):
            ssi.hparams[name].string_value = value
            kind = "DATA_TYPE_STRING"
        elif isinstance(value, bool):
            ssi.hparams[name].bool_value = value
            kind = "DATA_TYPE_BOOL"
        else:
            ssi.hparams[name].number_value = float(value)
            kind = "DATA_TYPE_FLOAT64"
        info = HParamInfo(name=name, display_name=key, type=DataType.Value(kind))
        if key in rank:
            # tensorboardX's copy of api.proto predates HParamInfo.differs (field 7, bool):
            # append it as raw wire bytes (tag 7 << 3 | varint, value 1); protobuf keeps an
            # unknown field through parse and serialise, and TensorBoard reads it as differs.
            info = HParamInfo.FromString(info.SerializeToString() + _DIFFERS_TRUE)
        domain = (domains or {}).get(key)
        if domain is None and kind == "DATA_TYPE_BOOL":
            domain = (False, True)
        if domain is not None:
            values = ListValue()
            values.extend(list(domain))
            info.domain_discrete.CopyFrom(values)
        infos.append(info)
    exp = Experiment(hparam_infos=infos,
                     metric_infos=[MetricInfo(name=MetricName(tag=m), display_name=m)
                                   for m in HPARAMS_METRICS])

    def plugin_summary(tag: str, data: HParamsPluginData) -> Summary:
        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
            plugin_name="hparams", content=data.SerializeToString()))
        return Summary(value=[Summary.Value(tag=tag, metadata=meta)])

    summaries = (
        plugin_summary("_hparams_/experiment", HParamsPluginData(experiment=exp, version=0)),
        plugin_summary("_hparams_/session_start_info",
                       HParamsPluginData(session_start_info=ssi, version=0)),
        plugin_summary("_hparams_/session_end_info", HParamsPluginData(
            session_end_info=SessionEndInfo(status=Status.Value(_STATUS_TO_SESSION[status]),
                                            end_time_secs=time.time()), version=0)))
    with SummaryWriter(logdir=logdir, filename_suffix=HPARAMS_SUFFIX) as w:
        for summary in summaries:
            w.file_writer.add_summary(summary)
        for k, v in metrics.items():
            w.add_scalar(k, v, step)
