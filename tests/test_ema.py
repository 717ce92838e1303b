import pytest
import torch
from torch import nn

from ctt.ema import ema_coefficient, ema_update, make_teacher, set_teacher_mode


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).to(
        torch.float64
    )


def perturb_(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_coefficient_schedule():
    assert ema_coefficient(0, 0.99) == 0.0
    assert ema_coefficient(1, 0.99) == 0.5
    assert ema_coefficient(3, 0.99) == pytest.approx(0.75)
    assert ema_coefficient(99, 0.99) == pytest.approx(0.99)
    assert ema_coefficient(10**6, 0.99) == 0.99
    with pytest.raises(ValueError, match="step"):
        ema_coefficient(-1, 0.99)
    with pytest.raises(ValueError, match="decay"):
        ema_coefficient(0, 1.5)


def test_matches_manual_loop_over_steps():
    student = tiny_net()
    teacher = make_teacher(student)
    perturb_(teacher, 123)  # start away from the student so step 0 is a real test
    ref = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    decay = 0.9
    for step in range(30):  # crosses the point where a reaches decay (step 9)
        perturb_(student, step)
        a_used = ema_update(teacher, student, step, decay)
        a = min(1.0 - 1.0 / (step + 1), decay)
        assert a_used == pytest.approx(a)
        for n, p in student.named_parameters():
            ref[n] = a * ref[n] + (1.0 - a) * p.detach()
        for n, p in teacher.named_parameters():
            torch.testing.assert_close(p, ref[n], rtol=1e-12, atol=1e-12)
        if step == 0:  # a = 0: the teacher becomes the student
            for pt, ps in zip(teacher.parameters(), student.parameters(), strict=True):
                torch.testing.assert_close(pt, ps, rtol=0, atol=0)


def test_large_step_uses_decay():
    student = tiny_net()
    teacher = make_teacher(student)
    t0 = [p.clone() for p in teacher.parameters()]
    perturb_(student, 5)
    ema_update(teacher, student, 10**6, 0.99)
    for pt, p0, ps in zip(teacher.parameters(), t0, student.parameters(), strict=True):
        torch.testing.assert_close(pt, 0.99 * p0 + 0.01 * ps)


@pytest.mark.parametrize("mode", ["copy", "params_only"])
def test_buffers(mode):
    student = tiny_net()
    teacher = make_teacher(student)
    before = {n: b.clone() for n, b in teacher.named_buffers()}
    student.train()
    student(torch.rand(4, 3, 8, 8, dtype=torch.float64))  # moves BN running statistics
    ema_update(teacher, student, 5, 0.99, buffers=mode)
    t_bufs = dict(teacher.named_buffers())
    s_bufs = dict(student.named_buffers())
    assert set(t_bufs) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    for n in t_bufs:
        expected = s_bufs[n] if mode == "copy" else before[n]
        torch.testing.assert_close(t_bufs[n], expected, rtol=0, atol=0)
    assert not torch.equal(s_bufs["1.running_mean"], before["1.running_mean"])


def test_teacher_frozen_and_mode_kept():
    student = tiny_net()
    teacher = make_teacher(student)
    assert not teacher.training and student.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for step in range(3):
        ema_update(teacher, student, step, 0.99)
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    set_teacher_mode(teacher, "train")
    ema_update(teacher, student, 3, 0.99)
    assert teacher.training  # the update never changes the mode the caller chose
    assert set_teacher_mode(teacher, "eval") is teacher and not teacher.training


def test_model_without_buffers():
    torch.manual_seed(1)
    student = nn.Linear(3, 2)
    teacher = make_teacher(student)
    perturb_(student, 0)
    for mode in ("copy", "params_only"):
        ema_update(teacher, student, 0, 0.99, buffers=mode)
        torch.testing.assert_close(teacher.weight, student.weight)


def test_errors():
    student = tiny_net()
    teacher = make_teacher(student)
    with pytest.raises(ValueError, match="copy.*params_only"):
        ema_update(teacher, student, 0, 0.99, buffers="average")
    with pytest.raises(ValueError, match="eval.*train"):
        set_teacher_mode(teacher, "test")
    trainable = tiny_net()
    with pytest.raises(ValueError, match="requires grad"):
        ema_update(trainable, student, 0, 0.99)
    with pytest.raises(ValueError, match="parameter names"):
        ema_update(make_teacher(nn.Linear(3, 2)), student, 0, 0.99)
