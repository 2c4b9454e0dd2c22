"""The learning-rate schedule: linear warmup then cosine decay, driven by torch's ``LambdaLR``.

Its values per step equal torch's own composition ``SequentialLR(LinearLR, CosineAnnealingLR)`` over
the schedule, hold at the minimum after it (where ``CosineAnnealingLR`` would climb again), and a
scheduler restored from a state dict continues with exactly the values of an uninterrupted one.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from ctm_dist.train.schedule import WarmupCosine


def lrs(scheduler_for, steps: int, state: dict | None = None) -> list[float]:
    """The lr used at each of ``steps`` optimizer steps (optionally after loading a checkpoint's
    optimizer and scheduler states, as a resumed engine does)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2e-3)
    sched = scheduler_for(opt)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_cosine_equals_torchs_linear_then_cosine_schedulers():
    base, warmup, total, start, low = (
        2e-3,
        50,
        1000,
        1e-6,
        1e-6,
    )  # the config's defaults over 1000 steps
    ours = lrs(
        lambda o: torch.optim.lr_scheduler.LambdaLR(
            o, WarmupCosine(base, warmup, total, start, low)
        ),
        1200,
    )
    theirs = lrs(
        lambda o: torch.optim.lr_scheduler.SequentialLR(
            o,
            [
                torch.optim.lr_scheduler.LinearLR(o, start / base, 1.0, warmup),
                torch.optim.lr_scheduler.CosineAnnealingLR(o, total - warmup, low),
            ],
            milestones=[warmup],
        ),
        total + 1,
    )
    assert ours[: total + 1] == pytest.approx(theirs, rel=1e-12, abs=0)
    assert ours[0] == pytest.approx(start) and ours[warmup] == pytest.approx(base)
    assert ours[total:] == pytest.approx([low] * (1200 - total), rel=1e-12)  # holds at the floor


def test_resumed_schedule_continues_exactly():
    def make(o):
        return torch.optim.lr_scheduler.LambdaLR(o, WarmupCosine(2e-3, 20, 300, 1e-6, 1e-6))

    whole = lrs(make, 300)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2e-3)
    sched = make(opt)
    for _ in range(137):
        opt.step()
        sched.step()
    state = pickle.loads(
        pickle.dumps({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    )
    assert (
        state["scheduler"]["lr_lambdas"][0]["warmup"] == 20
    )  # the schedule's settings travel with it
    resumed = lrs(make, 300 - 137, state)
    assert resumed == whole[137:]


def test_linear_decay_runs_straight_from_base_to_min_after_warmup():
    """The reference's RL ``--anneal_lr``: lr falls linearly to the minimum, then holds."""
    schedule = WarmupCosine(1e-3, 10, 110, start_lr=0.0, min_lr=0.0, linear=True)
    assert schedule.lr(5) == pytest.approx(5e-4)
    assert [schedule.lr(s) for s in (10, 60, 110, 200)] == pytest.approx([1e-3, 5e-4, 0.0, 0.0])
    old = WarmupCosine(1e-3, 10, 110, cosine=False)
    del old.linear  # a schedule pickled before the option existed
    assert old.lr(60) == 1e-3
