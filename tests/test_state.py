"""ctt.state.TrainState: construction, save/load round trip, atomic writes, clear errors for bad
files, fork preconditions, derive_seed."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config

import ctt.state
from ctt.state import CHECKPOINT_FORMAT, CheckpointError, TrainState, derive_seed
from ctt.step import train_step

S = 32
BASE = {
    "data.crop_size": S, "data.batch_size": 2, "data.batch_size_u": 2, "model.width": 8,
    "model.feat_dim": 32, "method.bank_size": 8, "method.bank_min_fill": 1,
    "method.warmup_iters": 1, "method.tau_bank": 0.0, "optim.iters": 10, "run.device": "cpu",
}


def make_cfg(variant: str = "ctt", **flat):
    """The tiny preset with BASE, ``variant`` and ``flat`` (``optim__iters=6``)."""
    return tiny_config(BASE, variant, **flat)


def make_batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x_l": torch.rand(2, 3, S, S, generator=g),
            "y_l": torch.randint(0, 7, (2, S, S), generator=g),
            "x_u": torch.rand(2, 3, S, S, generator=g)}


def tensors(state: TrainState) -> dict[str, torch.Tensor]:
    out = {}
    for role, nets in (("s", state.students), ("t", state.teachers), ("b", state.banks)):
        for k, net in enumerate(nets):
            out.update({f"{role}{k}.{n}": v for n, v in net.state_dict().items()})
    for k, opt in enumerate(state.optimizers):
        for pid, st in opt.state_dict()["state"].items():
            out.update({f"o{k}.{pid}.{n}": v for n, v in st.items() if torch.is_tensor(v)})
    return out


@pytest.fixture()
def trained(tmp_path):
    """A ctt state after 3 steps (1 of warm-up), saved to ``ckpt.pt``."""
    state = TrainState(make_cfg())
    state.num_labeled = 8
    for i in range(3):
        train_step(state, make_batch(i))
    state.streams = {"labeled": {"consumed": 6}, "unlabeled": {"consumed": 4}}
    path = state.save(tmp_path / "ckpt.pt")
    return state, path


def test_init_is_a_function_of_seed_and_student_index():
    a, b = TrainState(make_cfg()), TrainState(make_cfg("mean_teacher"))
    c = TrainState(make_cfg(run__seed=1))
    for x, y in zip(a.students[0].parameters(), b.students[0].parameters()):
        assert torch.equal(x, y)  # same seed: same student 0 in every variant
    assert any(not torch.equal(x, y) for x, y in zip(a.students[0].parameters(),
                                                      a.students[1].parameters()))
    assert any(not torch.equal(x, y) for x, y in zip(a.students[0].parameters(),
                                                      c.students[0].parameters()))
    for s, t in zip(a.students, a.teachers):  # teachers start as copies
        assert all(torch.equal(x, y) for x, y in zip(s.state_dict().values(),
                                                      t.state_dict().values()))


def test_save_load_round_trip_restores_everything(trained):
    state, path = trained
    # advance the RNGs so the loaded ones must come from the file
    rng_torch, rng_aug = torch.get_rng_state(), state.generator.get_state()
    torch.rand(10)
    loaded = TrainState.load(path)
    assert loaded.cfg == state.cfg
    assert loaded.step == 3 and loaded.contrast_on == state.contrast_on
    assert loaded.streams == state.streams
    assert torch.equal(torch.get_rng_state(), rng_torch)
    assert torch.equal(loaded.generator.get_state(), rng_aug)
    a, b = tensors(state), tensors(loaded)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert all(not m.training for t in loaded.teachers for m in t.modules())
    assert all(not p.requires_grad for t in loaded.teachers for p in t.parameters())
    for o1, o2 in zip(state.optimizers, loaded.optimizers):
        assert o1.state_dict()["param_groups"] == o2.state_dict()["param_groups"]


def test_checkpoint_is_weights_only_loadable_and_plain(trained):
    _, path = trained
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == CHECKPOINT_FORMAT
    assert obj["config"] == make_cfg().to_flat()
    assert isinstance(obj["rng"]["torch"], torch.Tensor)


def test_save_is_atomic(trained, monkeypatch):
    state, path = trained
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temp file left
    good = path.read_bytes()
    train_step(state, make_batch(7))
    real_save = torch.save

    def crash(obj, f, *a, **kw):
        f.write(good[: len(good) // 3])  # half-written, then the machine "dies"
        raise OSError("disk full")

    monkeypatch.setattr(ctt.state.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        state.save(path)
    monkeypatch.setattr(ctt.state.torch, "save", real_save)
    assert path.read_bytes() == good
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]
    assert TrainState.load(path).step == 3


def test_truncated_foreign_and_missing_files_raise_checkpoint_error(trained, tmp_path):
    _, path = trained
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {cut}"):
        TrainState.load(cut)
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": 1}, foreign)
    with pytest.raises(CheckpointError, match=f"{foreign} is not a ctt TrainState checkpoint"):
        TrainState.load(foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "obj": TrainState}, pickled)  # not weights-only
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {pickled}"):
        TrainState.load(pickled)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        TrainState.load(tmp_path / "nope.pt")
    broken = torch.load(path, weights_only=True)
    del broken["banks"]
    torch.save(broken, tmp_path / "nobanks.pt")
    with pytest.raises(CheckpointError, match="nobanks.pt"):
        TrainState.load(tmp_path / "nobanks.pt")


def test_load_checks_the_config(trained):
    _, path = trained
    with pytest.raises(CheckpointError, match="method.lambda_h"):
        TrainState.load(path, make_cfg(method__lambda_h=0.5))
    # run-only keys and the total iteration count (extending a run) may differ
    loaded = TrainState.load(path, make_cfg(run__eval_every=7, optim__iters=20))
    assert loaded.cfg.optim.iters == 20 and loaded.step == 3


def test_fork_preconditions(tmp_path):
    warm = TrainState(make_cfg(method__warmup_iters=2))
    for i in range(2):
        train_step(warm, make_batch(i))
    path = warm.save(tmp_path / "warm.pt")
    forked = TrainState.fork(path, make_cfg("mean_teacher", method__warmup_iters=2))
    assert len(forked.students) == len(forked.teachers) == 1 and not forked.banks
    assert forked.step == 2 and not forked.contrast_on
    for a, b in zip(forked.students[0].state_dict().values(),
                    warm.students[0].state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="method.ema_decay"):
        TrainState.fork(path, make_cfg("mean_teacher", method__warmup_iters=2,
                                       method__ema_decay=0.5))
    train_step(warm, make_batch(2))
    late = warm.save(tmp_path / "late.pt")
    with pytest.raises(CheckpointError, match="step 3 is past the warm-up"):
        TrainState.fork(late, make_cfg(method__warmup_iters=2))
    sup = TrainState(make_cfg("supervised", method__warmup_iters=2))
    sup_path = sup.save(tmp_path / "sup.pt")
    with pytest.raises(CheckpointError, match="it has 1 students, 2 needed"):
        TrainState.fork(sup_path, make_cfg(method__warmup_iters=2))


def test_derive_seed_is_a_pure_hash():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    seeds = {derive_seed(0, 1, 2), derive_seed(0, 2, 1), derive_seed(1, 1, 2), derive_seed(0, 1),
             derive_seed(0, 3, 0)}
    assert len(seeds) == 5  # order matters, no additive collisions (0+3 = 1+2)
    assert all(0 <= s < 2 ** 63 for s in seeds)
