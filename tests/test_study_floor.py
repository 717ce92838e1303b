"""benchmarks/study_floor.py: the list-scheduling estimate behind README's 4- and 8-core times."""

from __future__ import annotations

from benchmark_scripts import load_benchmark


def test_list_schedule_waits_for_the_warmup_and_fills_slots_longest_first() -> None:
    floor = load_benchmark("study_floor")
    trials = [{"seed": 0, "wall_s": 5.0}, {"seed": 0, "wall_s": 3.0},
              {"seed": 1, "wall_s": 4.0}, {"seed": 1, "wall_s": 2.0}]
    warm = {0: 1.0, 1: 1.0}
    # 1 slot: everything in a row
    assert floor.list_schedule(trials, warm, 1) == 16.0
    # 2 slots: warm-ups 0|1 end at 1; then 5 (slot A: 1-6), 4 (B: 1-5), 3 (B: 5-8), 2 (A: 6-8)
    assert floor.list_schedule(trials, warm, 2) == 8.0
    # many slots: the longest chain, warm-up + longest trial
    assert floor.list_schedule(trials, warm, 8) == 6.0
