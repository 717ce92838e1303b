"""Reading TensorBoard event files back in tests, without TensorBoard itself."""

from __future__ import annotations

import glob
import os
import struct

from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData


def read_events(logdir: str | os.PathLike[str]) -> list[tuple[str, Event]]:
    """All events of all event files in logdir: TFRecord = len u64, crc u32, data, crc u32."""
    out = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = Event()
            ev.ParseFromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            out.append((path, ev))
    return out


def hparams_records(logdir: str | os.PathLike[str]) -> list[HParamsPluginData]:
    """The HParams plugin payloads (experiment, session start/end) of every event file."""
    out = []
    for _, ev in read_events(logdir):
        for v in ev.summary.value:
            if v.metadata.plugin_data.plugin_name == "hparams":
                data = HParamsPluginData()
                data.ParseFromString(v.metadata.plugin_data.content)
                out.append(data)
    return out
