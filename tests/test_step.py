"""ctt.step.train_step: who teaches whom, which terms each variant switches on, the NaN guard,
the teachers' mode and gradients. Batches are random tensors; the model is a tiny network."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from benchmark_scripts import load_benchmark
from helpers import tiny_config

import ctt.step
from ctt.config import VARIANTS, apply_variant
from ctt.state import TrainState
from ctt.step import PEER, NonFiniteLossError, train_step

C, D, S = 7, 32, 32  # classes, feature dim, crop side

BASE = {
    "data.crop_size": S, "data.batch_size": 2, "data.batch_size_u": 2, "model.width": 8,
    "model.feat_dim": D, "method.bank_size": 8, "method.bank_min_fill": 1,
    "method.warmup_iters": 0, "optim.iters": 10, "run.device": "cpu",
}


def make_cfg(variant: str = "ctt", **flat):
    """The tiny preset with BASE, ``variant`` and ``flat`` (``optim__iters=6``)."""
    return tiny_config(BASE, variant, **flat)


def make_batch(seed: int = 0, b: int = 2, b_u: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y_l = torch.randint(0, C, (b, S, S), generator=g)
    y_l[:, :3] = 255  # an ignored band, as padding would give
    return {"x_l": torch.rand(b, 3, S, S, generator=g), "y_l": y_l,
            "x_u": torch.rand(b_u, 3, S, S, generator=g)}


def fill_banks(state: TrainState, per_class: int = 4) -> None:
    """Put random unit features of every class into every bank and latch contrast on."""
    g = torch.Generator().manual_seed(123)
    for bank in state.banks:
        feats = F.normalize(torch.randn(C * per_class, D, generator=g), dim=1)
        bank.push(feats, torch.arange(C).repeat(per_class))
    state.contrast_on = bool(state.banks)


def snapshot(state: TrainState) -> dict[str, torch.Tensor]:
    """Every tensor of the state (parameters, buffers, banks, optimiser moments), cloned."""
    out = {}
    for role, nets in (("s", state.students), ("t", state.teachers), ("b", state.banks)):
        for k, net in enumerate(nets):
            for name, v in net.state_dict().items():
                out[f"{role}{k}.{name}"] = v.clone()
    for k, opt in enumerate(state.optimizers):
        for pid, st in opt.state_dict()["state"].items():
            for name, v in st.items():
                if torch.is_tensor(v):
                    out[f"o{k}.{pid}.{name}"] = v.clone()
    out["aug_rng"] = state.generator.get_state()
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- who teaches whom --------------------------------------------------------------------------

def _fake_teacher(cls: int):
    """A teacher forward that predicts class ``cls`` everywhere with probability ~1."""
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        logits = torch.full((b, C, h // 4, w // 4), -30.0)
        logits[:, cls] = 30.0
        return logits, F.normalize(torch.ones(b, D, h // 4, w // 4), dim=1)
    return forward


@pytest.mark.parametrize("mix", ["none", "classmix", "cutmix"])
@pytest.mark.parametrize("shared_aug", [True, False])
@pytest.mark.parametrize("variant", ["ctt", "dual_self", "mean_teacher"])
def test_student_learns_from_peer_teacher_under_cross_and_own_under_self(
        monkeypatch, variant, shared_aug, mix):
    cfg = make_cfg(variant, method__mix=mix, method__shared_aug=shared_aug)
    state = TrainState(cfg)
    for k, teacher in enumerate(state.teachers):
        teacher.forward = _fake_teacher(1 + k)  # T_0 says class 1, T_1 says class 2
    calls = []
    real = ctt.step.pseudo_label_ce

    def spy(logits, pseudo, conf, **kw):
        calls.append((pseudo.clone(), conf.clone()))
        return real(logits, pseudo, conf, **kw)

    monkeypatch.setattr(ctt.step, "pseudo_label_ce", spy)
    train_step(state, make_batch())
    pairs = cfg.method.pairs
    assert len(calls) == pairs  # one call per student, in student order
    for k, (pseudo, conf) in enumerate(calls):
        source = PEER[k] if cfg.method.unsup == "cross" else k
        assert pseudo.shape == (2, S, S)
        assert (pseudo == 1 + source).all(), f"student {k}: labels {pseudo.unique().tolist()}"
        assert conf.min() > 0.999


# --- each variant changes only what it names ---------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_builds_its_networks_and_switches_its_terms(variant):
    base = make_cfg("ctt", method__tau_p=0.0, method__weighting="uniform")
    cfg = apply_variant(base, variant)
    changed = {k for k, v in cfg.to_flat().items() if base.to_flat()[k] != v}
    assert changed <= set(VARIANTS[variant])
    m = cfg.method
    state = TrainState(cfg)
    assert len(state.students) == len(state.optimizers) == m.pairs
    assert len(state.teachers) == (0 if m.unsup == "none" else m.pairs)
    contrast = m.unsup != "none" and (m.lambda_h > 0 or m.lambda_l > 0)
    assert len(state.banks) == (m.pairs if contrast else 0)
    fill_banks(state)

    batch = make_batch()
    if m.unsup == "none":
        del batch["x_u"]  # supervised needs no unlabeled batch
    else:
        with pytest.raises(ValueError, match="x_u"):
            train_step(state, {"x_l": batch["x_l"], "y_l": batch["y_l"]})
    out = train_step(state, batch)

    assert out["loss/sup"] > 0
    assert (out["loss/unsup"] > 0) == (m.unsup != "none")
    assert (out["pl/weight"] == 1.0) == (m.unsup != "none")  # tau_p = 0: every pixel counts
    assert (out["loss/hc"] > 0) == (m.lambda_h > 0 and m.unsup != "none")
    assert (out["n/anchors_hc"] > 0) == (m.lambda_h > 0 and m.unsup != "none")
    assert (out["loss/lc"] > 0) == (m.lambda_l > 0 and m.pairs == 2 and m.unsup != "none")
    assert (out["n/anchors_lc"] > 0) == (m.lambda_l > 0 and m.pairs == 2 and m.unsup != "none")
    assert out["contrast_on"] == float(contrast)
    expected = (out["loss/sup"] + m.lambda_u * out["loss/unsup"] + m.lambda_h * out["loss/hc"]
                + m.lambda_l * out["loss/lc"])
    assert out["loss/total"] == pytest.approx(expected, rel=1e-6)
    assert out["step"] == 1.0 and state.step == 1


def test_warmup_is_supervised_only_and_needs_no_unlabeled_batch():
    state = TrainState(make_cfg("ctt", method__warmup_iters=2, method__tau_p=0.0))
    fill_banks(state)
    batch = make_batch()
    del batch["x_u"]
    for _ in range(2):
        out = train_step(state, batch)
        assert out["loss/unsup"] == out["loss/hc"] == out["loss/lc"] == 0.0
        assert out["loss/total"] == out["loss/sup"]
    with pytest.raises(ValueError, match="step 2.*x_u"):
        train_step(state, batch)
    out = train_step(state, make_batch())
    assert out["loss/unsup"] > 0 and out["loss/hc"] > 0 and out["loss/lc"] > 0


def test_contrast_latches_when_banks_ready():
    cfg = make_cfg("ctt", method__tau_bank=0.0, method__bank_ready="min_fill")
    state = TrainState(cfg)
    assert not state.contrast_on
    out = train_step(state, make_batch())
    assert all(int(b.counts.sum()) > 0 for b in state.banks)
    assert out["bank/fill"] == pytest.approx(sum(b.fill for b in state.banks) / 2)
    # tau_bank = 0 keeps every correctly predicted pixel; readiness follows bank_ready().
    from ctt.memory_bank import bank_ready

    assert state.contrast_on == bank_ready(list(state.banks), "min_fill", 1)
    state.contrast_on = True
    for bank in state.banks:  # empty banks do not switch the latch off
        bank.count.zero_()
    train_step(state, make_batch(1))
    assert state.contrast_on


# --- teachers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["eval", "train"])
def test_teachers_are_ema_copies_without_grads_in_configured_mode(mode):
    state = TrainState(make_cfg("ctt", method__teacher_mode=mode))
    fill_banks(state)
    before = [p.clone() for p in state.teachers[0].parameters()]
    for i in range(3):
        train_step(state, make_batch(i))
        if i == 0:  # a = 0 at t = 0: the teacher equals its student after the first step
            for s, t in zip(state.students, state.teachers):
                for ps, pt in zip(s.parameters(), t.parameters()):
                    assert torch.equal(ps, pt)
    for s, t in zip(state.students, state.teachers):
        assert all(m.training == (mode == "train") for m in t.modules())
        assert all(not p.requires_grad and p.grad is None for p in t.parameters())
        assert all(m.training for m in s.modules())
        assert any(p.grad is not None for p in s.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, state.teachers[0].parameters()))


def test_students_are_independent():
    """Student 0's update does not depend on student 1 during warm-up (paired design)."""
    two = TrainState(make_cfg("ctt", method__warmup_iters=5))
    one = TrainState(make_cfg("supervised", method__warmup_iters=5))
    batch = make_batch()
    del batch["x_u"]
    for _ in range(2):
        train_step(two, batch)
        train_step(one, batch)
    for a, b in zip(two.students[0].state_dict().values(), one.students[0].state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_same_state_and_batch_give_same_result_other_seed_differs(mode):
    runs = []
    for seed in (0, 0, 1):
        state = TrainState(make_cfg("ctt", run__seed=seed, method__tau_p=0.0,
                                    method__student_forward=mode))
        fill_banks(state)
        metrics = [train_step(state, make_batch(i)) for i in range(2)]
        runs.append((metrics, snapshot(state)))
    assert runs[0][0] == runs[1][0]
    assert_same(runs[0][1], runs[1][1])
    assert runs[0][0][-1]["loss/total"] != runs[2][0][-1]["loss/total"]


# --- student forwards -------------------------------------------------------------------------

def _record_forward_sizes(state: TrainState) -> list[tuple[int, int]]:
    sizes: list[tuple[int, int]] = []
    for k, student in enumerate(state.students):
        def spy(x, real=student.forward, k=k):
            sizes.append((k, x.shape[0]))
            return real(x)
        student.forward = spy  # nn.Module.__call__ looks forward up on the instance first
    return sizes


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_student_forward_runs_one_or_two_forwards(mode):
    state = TrainState(make_cfg("ctt", method__student_forward=mode, method__warmup_iters=1))
    fill_banks(state)
    sizes = _record_forward_sizes(state)
    warm = make_batch(b=2, b_u=3)
    del warm["x_u"]
    train_step(state, warm)  # warm-up: labeled images only, one forward in either mode
    assert sizes == [(0, 2), (1, 2)]
    sizes.clear()
    out = train_step(state, make_batch(b=2, b_u=3))
    assert sizes == ([(0, 2), (0, 3), (1, 2), (1, 3)] if mode == "separate" else [(0, 5), (1, 5)])
    assert out["loss/unsup"] > 0 and out["loss/hc"] > 0 and out["loss/lc"] > 0


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_separate_forward_normalises_each_set_with_its_own_statistics(monkeypatch, mode):
    """With `separate` the labeled logits are exactly those of the labeled batch alone (BN
    batch statistics of that set); with `joint` the unlabeled images shift them."""
    state = TrainState(make_cfg("ctt", method__student_forward=mode, model__dropout=0.0))
    batch = make_batch()
    batch["x_u"] = 0.8 + 0.2 * batch["x_u"]  # other statistics than the labeled images
    alone = copy.deepcopy(state.students[0]).train()
    with torch.no_grad():
        expected = F.interpolate(alone(batch["x_l"])[0], size=(S, S), mode="bilinear",
                                 align_corners=True)
    seen = []
    real = ctt.step.supervised_ce

    def spy(logits, y):
        seen.append(logits.detach())
        return real(logits, y)

    monkeypatch.setattr(ctt.step, "supervised_ce", spy)
    train_step(state, batch)
    if mode == "separate":
        torch.testing.assert_close(seen[0], expected)
    else:
        assert not torch.allclose(seen[0], expected, atol=1e-4)


def test_warmup_is_identical_for_both_student_forward_modes():
    """A study may fork `separate` and `joint` variants from one warm-up checkpoint."""
    states = [TrainState(make_cfg("ctt", method__student_forward=mode, method__warmup_iters=2))
              for mode in ("separate", "joint")]
    batch = make_batch()
    del batch["x_u"]
    for state in states:
        for _ in range(2):
            train_step(state, batch)
    assert_same(snapshot(states[0]), snapshot(states[1]))


# --- the phases, as the step benchmark runs them ----------------------------------------------

@pytest.mark.parametrize("variant, flat", [
    ("ctt", {}),
    ("ctt", {"method__shared_aug": False, "method__student_forward": "joint",
             "method__max_anchors": 5, "method__teacher_mode": "train"}),
    ("ctt", {"method__warmup_iters": 1, "method__strong_color": "permute"}),
    ("cross", {}), ("mean_teacher", {}), ("supervised", {})])
def test_benchmark_phases_compose_to_train_step(variant, flat):
    """benchmarks/bench_step.py times train_step's phases by calling them one by one
    (``phased_step``): from one state and batch, both give the same metrics (values and order)
    and the same state, bit for bit, so the benchmark times the real step."""
    bench = load_benchmark("bench_step")
    state = TrainState(make_cfg(variant, **flat))
    fill_banks(state)
    twin = copy.deepcopy(state)
    for i in range(3):
        batch = make_batch(i)
        expected = train_step(state, batch)
        got = bench.phased_step(twin, batch)
        assert list(got.items()) == list(expected.items()), i
    assert (twin.step, twin.contrast_on) == (state.step, state.contrast_on)
    assert_same(snapshot(state), snapshot(twin))


# --- NaN guard --------------------------------------------------------------------------------

def test_nan_images_raise_and_leave_state_untouched():
    state = TrainState(make_cfg("ctt", method__teacher_mode="train"))
    fill_banks(state)
    train_step(state, make_batch(0))
    before = snapshot(state)
    batch = make_batch(1)
    batch["x_l"][0, :, 5, 5] = math.nan
    with pytest.raises(NonFiniteLossError, match=r"loss/sup \(student 0\).* at step 1") as e:
        train_step(state, batch)
    assert e.value.step == 1 and e.value.term == "loss/sup (student 0)"
    assert math.isnan(e.value.value)
    assert state.step == 1 and state.contrast_on
    assert_same(before, snapshot(state))  # parameters, BN statistics, banks, moments, aug RNG
    train_step(state, make_batch(1))  # and the run can go on from there
    assert state.step == 2


@pytest.mark.parametrize("term, fn, student", [
    ("loss/unsup", "pseudo_label_ce", 1), ("loss/hc", "high_level_contrast", 0),
    ("loss/lc", "low_level_contrast", 1)])
def test_nan_in_any_term_is_named(monkeypatch, term, fn, student):
    state = TrainState(make_cfg("ctt"))
    fill_banks(state)
    real = getattr(ctt.step, fn)
    calls = []

    def poisoned(*args, **kw):
        out = real(*args, **kw)
        calls.append(1)
        if len(calls) - 1 != student:
            return out
        return ((out[0] * math.inf, out[1]) if isinstance(out, tuple) else out * math.nan)

    monkeypatch.setattr(ctt.step, fn, poisoned)
    before = snapshot(state)
    with pytest.raises(NonFiniteLossError, match=f"{term} \\(student {student}\\)"):
        train_step(state, make_batch())
    assert_same(before, snapshot(state))
    assert state.step == 0
