"""ctt.train: the Trainer's bit-exact resume and fork, seeds, and the CLI (files, resume,
refusal to overwrite, NaN exit)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import ctt.step
from ctt.config import PRESETS, apply_variant
from ctt.data import synthetic
from ctt.data.loader import build_datasets
from ctt.state import TrainState
from ctt.train import Trainer, latest_checkpoint, main

SMALL = {
    "data.crop_size": 32, "data.batch_size": 2, "data.batch_size_u": 2, "data.labeled_split": "8",
    "model.width": 8, "model.feat_dim": 32, "method.bank_size": 8, "method.bank_min_fill": 1,
    "method.warmup_iters": 2, "method.tau_bank": 0.0, "method.tau_p": 0.0,
    "method.max_anchors": 16, "optim.iters": 10, "run.device": "cpu", "run.log_every": 1,
}
METRICS = {"step", "miou", "miou/student0", "loss/total", "loss/sup", "loss/unsup", "loss/hc",
           "loss/lc", "pl/weight", "n/anchors_hc", "n/anchors_lc", "bank/fill", "contrast_on"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synth"), num_train=24, num_val=6,
                              num_test=6, size=32, label_counts=(8,))


@pytest.fixture(scope="module")
def datasets(root):
    return build_datasets(make_cfg(root))


def make_cfg(root, variant: str = "ctt", **flat):
    cfg = apply_variant(PRESETS["tiny"].override({**SMALL, "data.root": str(root)}), variant)
    return cfg.override({k.replace("__", "."): v for k, v in flat.items()})


def run(trainer: Trainer, until: int) -> list[dict[str, float]]:
    """Train to ``until``; the per-step metrics without wall-clock values."""
    out: list[dict[str, float]] = []
    trainer.fit(until=until, on_log=lambda m: out.append(
        {k: v for k, v in m.items() if not k.startswith("time/")}))
    return out


def tensors(state: TrainState) -> dict[str, torch.Tensor]:
    out = {}
    for role, nets in (("s", state.students), ("t", state.teachers), ("b", state.banks)):
        for k, net in enumerate(nets):
            out.update({f"{role}{k}.{n}": v for n, v in net.state_dict().items()})
    for k, opt in enumerate(state.optimizers):
        for pid, st in opt.state_dict()["state"].items():
            out.update({f"o{k}.{pid}.{n}": v for n, v in st.items() if torch.is_tensor(v)})
    out["rng/aug"] = state.generator.get_state()
    return out


def assert_same_state(a: TrainState, b: TrainState) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert (a.step, a.contrast_on, a.streams) == (b.step, b.contrast_on, b.streams)


def test_resume_is_bit_exact(root, datasets, tmp_path):
    cfg = make_cfg(root, optim__iters=6)
    straight = Trainer(cfg, datasets=datasets)
    straight.state.contrast_on = True  # force the contrastive terms and bank from step 2 on
    want = run(straight, 6)

    first = Trainer(cfg, datasets=datasets)
    first.state.contrast_on = True
    got = run(first, 3)  # stops inside the semi-supervised phase, after the warm-up
    first.state.save(tmp_path / "ckpt.pt")
    torch.manual_seed(999)  # whatever happens in between must not matter
    resumed = Trainer(cfg, TrainState.load(tmp_path / "ckpt.pt", cfg), datasets=datasets)
    got += run(resumed, 6)

    assert got == want
    assert all(m["loss/hc"] > 0 and m["loss/lc"] > 0 and m["loss/unsup"] > 0 for m in got[2:])
    assert_same_state(resumed.state, straight.state)
    assert resumed.state.streams == {"labeled": {"consumed": 12}, "unlabeled": {"consumed": 8}}


def test_fork_of_warmup_equals_training_from_scratch(root, datasets, tmp_path):
    warm = Trainer(make_cfg(root), datasets=datasets)
    run(warm, 2)
    path = warm.state.save(tmp_path / "warm.pt")
    for variant in ("supervised", "mean_teacher", "ctt"):
        cfg = make_cfg(root, variant)
        scratch = Trainer(cfg, datasets=datasets)
        want = run(scratch, 4)
        forked = Trainer(cfg, TrainState.fork(path, cfg), datasets=datasets)
        got = want[:2] + run(forked, 4)
        assert got == want, variant
        assert_same_state(forked.state, scratch.state)


def test_same_seed_same_metrics_other_seed_differs(root, datasets):
    a, b, c = (run(Trainer(make_cfg(root, run__seed=s), datasets=datasets), 3)
               for s in (0, 0, 1))
    assert a == b
    assert [m["loss/total"] for m in a] != [m["loss/total"] for m in c]


def test_evaluate_reports_every_network(root, datasets):
    trainer = Trainer(make_cfg(root), datasets=datasets)
    rng = torch.get_rng_state()
    res = trainer.evaluate()
    assert torch.equal(rng, torch.get_rng_state())  # evaluating leaves training's RNG alone
    assert set(res) == {"miou", "miou/student0", "miou/student1", "miou/teacher0",
                        "miou/teacher1"}
    assert res["miou"] == pytest.approx((res["miou/student0"] + res["miou/student1"]) / 2)
    assert all(0.0 <= v <= 100.0 for v in res.values())
    assert not any(m.training for t in trainer.state.teachers for m in t.modules())
    assert all(m.training for s in trainer.state.students for m in s.modules())


# --- CLI ---------------------------------------------------------------------------------------

def cli_args(root, out, iters: int) -> list[str]:
    args = ["--preset", "tiny", "--variant", "ctt", "--data-root", str(root), "--iters",
            str(iters), "--eval-every", "2", "--out", str(out)]
    for key, value in SMALL.items():
        if key not in ("optim.iters", "run.device"):
            args += ["--set", f"{key}={value}"]
    return args + ["--set", "run.checkpoint_every=2", "--set", "run.log_every=1"]


def read_records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_writes_its_files_and_resumes(root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(root, out, 3)) == 0
    conf = json.loads((out / "config.json").read_text())
    assert conf["config"]["optim.iters"] == 3 and conf["variant"] == "ctt"
    assert {"torch", "numpy"} <= set(conf["env"]["versions"])
    assert conf["env"]["git_commit"]
    records = read_records(out)
    assert [r["step"] for r in records] == [1, 2, 3]  # one record per step, evals merged in
    for r in records:
        assert {k for k in r if not k.startswith("time/")} >= METRICS - {"miou", "miou/student0"}
    assert METRICS <= set(records[1]) and METRICS <= set(records[2])  # eval at 2 and at the end
    clock = {k for r in records for k in r if "time" in k or k.endswith("_s")}
    assert clock and all(k.startswith("time/") for k in clock)
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000002.pt", "step_00000003.pt"]

    capsys.readouterr()
    assert main(cli_args(root, out, 5)) == 2  # existing checkpoints: refuse without --resume
    assert "--resume" in capsys.readouterr().err
    assert main(cli_args(root, out, 5) + ["--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in read_records(out)] == [1, 2, 3, 4, 5]
    assert latest_checkpoint(out / "checkpoints").name == "step_00000005.pt"
    assert TrainState.load(latest_checkpoint(out / "checkpoints")).step == 5
    # a finished run resumed with the same total has nothing left to do
    assert main(cli_args(root, out, 5) + ["--resume"]) == 0
    # a resume whose config disagrees with the checkpoint is a clear error, not a traceback
    capsys.readouterr()
    assert main(cli_args(root, out, 6) + ["--resume", "--set", "method.lambda_h=0.5"]) == 1
    assert "method.lambda_h" in capsys.readouterr().err


def test_cli_nan_exits_1_and_keeps_the_last_good_checkpoint(root, tmp_path, monkeypatch,
                                                             capsys):
    real = ctt.step.supervised_ce
    calls = []

    def nan_at_step_3(logits, labels):
        calls.append(1)
        loss = real(logits, labels)
        return loss * math.nan if len(calls) > 4 else loss  # 2 students x 2 good steps

    monkeypatch.setattr(ctt.step, "supervised_ce", nan_at_step_3)
    out = tmp_path / "nan"
    assert main(cli_args(root, out, 4)) == 1
    err = capsys.readouterr().err
    assert "non-finite loss/sup (student 0) = nan at step 2" in err
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000002.pt"]  # no temp files, nothing past the last good step
    assert TrainState.load(out / "checkpoints" / ckpts[0]).step == 2
