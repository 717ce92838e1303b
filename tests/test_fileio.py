"""ctt.fileio: atomic writes (never half a file, no temp left behind, usual permissions) and the
one metrics.jsonl encoding (strict JSON, NaN/inf round trip, truncation on resume)."""

from __future__ import annotations

import json
import math
import os

import pytest

from ctt.fileio import (
    append_record,
    as_int,
    atomic_open,
    atomic_write_bytes,
    atomic_write_text,
    decode_record,
    encode_record,
    is_atomic_temp,
    truncate_records,
)

# --- atomic writes ------------------------------------------------------------------------------


def test_atomic_write_replaces_creates_parents_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "b" / "report.md"
    atomic_write_text(path, "old ü\n")
    atomic_write_text(path, "new ü\n")
    assert path.read_bytes() == "new ü\n".encode()
    atomic_write_bytes(tmp_path / "blob.bin", b"\x00\x01", fsync=True)
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["blob.bin", "report.md"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "trial.json"
    path.write_text('{"ok": 1}')
    with pytest.raises(RuntimeError, match="killed"), atomic_open(path) as f:
        f.write('{"half')
        temps = [n for n in os.listdir(tmp_path) if n != "trial.json"]
        assert len(temps) == 1 and is_atomic_temp(temps[0], "trial.json")  # written beside it
        raise RuntimeError("killed mid-write")
    assert path.read_text() == '{"ok": 1}'
    assert os.listdir(tmp_path) == ["trial.json"]


def test_atomic_write_uses_the_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "study.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "study.json").stat().st_mode & 0o777 == 0o644


def test_atomic_write_error_names_the_target_not_the_temp(tmp_path, monkeypatch):
    def refuse(name, *args):  # what an unwritable directory does (root is never refused)
        raise PermissionError(13, "Permission denied", os.fspath(name))

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(PermissionError) as e:
        atomic_write_text(tmp_path / "report.md", "x")
    assert e.value.filename == str(tmp_path / "report.md") and e.value.strerror


def test_is_atomic_temp():
    assert is_atomic_temp(".dataset.json.123.ab12cd34.tmp", "dataset.json")
    assert not is_atomic_temp("dataset.json", "dataset.json")
    assert not is_atomic_temp(".other.json.1.ab.tmp", "dataset.json")


def test_atomic_open_rejects_other_modes(tmp_path):
    with pytest.raises(ValueError, match="mode must be"), atomic_open(tmp_path / "x", "a"):
        pass


# --- metrics.jsonl records ----------------------------------------------------------------------

def test_nonfinite_values_round_trip_as_strict_json():
    rec = {"step": 3, "miou": math.nan, "loss/total": math.inf, "loss/hc": -math.inf,
           "loss/sup": 0.1 + 0.2, "contrast_on": True, "error": "nan", "node_ip": None}
    line = encode_record(rec)
    assert line.endswith("\n") and line.count("\n") == 1
    strict = json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in {line}"))
    assert strict["miou"] == "nan" and strict["loss/total"] == "inf"
    back = decode_record(line)
    assert math.isnan(back["miou"]) and back["loss/total"] == math.inf
    assert back["loss/hc"] == -math.inf and back["loss/sup"] == 0.1 + 0.2  # exact repr
    assert back["contrast_on"] is True and back["step"] == 3 and back["node_ip"] is None
    assert back["error"] == "nan"  # a text field stays text


def test_decode_reads_lines_with_bare_nan_written_before_the_format():
    assert math.isnan(decode_record('{"step": 1, "miou": NaN}')["miou"])
    with pytest.raises(json.JSONDecodeError):
        decode_record('{"step": 2, "mi')


def test_encode_refuses_values_json_cannot_hold():
    with pytest.raises(TypeError):
        encode_record({"step": 1, "x": object()})


def test_as_int():
    assert as_int(4) == 4 and as_int(4.0) == 4 and type(as_int(4.0)) is int
    assert as_int(4.5) is None and as_int(True) is None and as_int("4") is None


def test_append_and_truncate_keep_lines_before_the_step(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    truncate_records(path, 5)  # nothing written yet: stays absent
    assert not path.exists()
    for step in (1, 2, 3):
        append_record(path, {"step": step, "miou": math.nan if step == 2 else float(step)})
    with open(path, "a") as f:
        f.write('{"step": 4, "mi')  # torn by a kill
    truncate_records(path, 3)
    lines = path.read_text().splitlines()
    assert [decode_record(line)["step"] for line in lines] == [1, 2]
    assert lines[1] == '{"step": 2, "miou": "nan"}'  # kept verbatim
    append_record(path, {"step": 3, "miou": 3.5})
    assert [decode_record(line)["miou"] for line in path.read_text().splitlines()][2] == 3.5
