"""Generated sorting data: the reference's distribution, split by rank, resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctm_dist.data.reader import merge_states
from ctm_dist.data.sort import SortLoader, sort_samples


def test_targets_sort_the_inputs_and_samples_depend_only_on_seed_epoch_index():
    x, y = sort_samples(np.arange(200), 30, seed=3, epoch=0)
    assert x.shape == (200, 30) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.all(torch.gather(x, 1, y).diff(dim=1) >= 0)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # N(0, 1)
    again, _ = sort_samples(np.array([7, 150]), 30, seed=3, epoch=0)
    assert torch.equal(again, x[[7, 150]])
    assert not torch.equal(sort_samples(np.array([7]), 30, seed=3, epoch=1)[0], x[[7]])
    assert not torch.equal(sort_samples(np.array([7]), 30, seed=4, epoch=0)[0], x[[7]])


def _inputs(loader, batches):
    out = []
    for batch in loader:
        out.append(batch["input"])
        if len(out) == batches:
            break
    return out


def test_ranks_split_the_stream_and_a_resume_with_another_world_size_continues_it():
    single = _inputs(SortLoader(6, batch_size=4, seed=1, samples_per_epoch=64), 6)
    ranks = [SortLoader(6, batch_size=2, rank=r, world_size=2, seed=1) for r in range(2)]
    steps = [_inputs(loader, 2) for loader in ranks]
    for step in range(2):  # step s of the 2-rank job is batch s of the 1-rank job
        assert torch.equal(torch.cat([steps[0][step], steps[1][step]]), single[step])
    state = merge_states([loader.state_dict() for loader in ranks])
    resumed = SortLoader(6, batch_size=4, seed=1, samples_per_epoch=64)
    resumed.load_state_dict(state)
    assert torch.equal(_inputs(resumed, 1)[0], single[2])


def test_state_of_another_length_or_seed_is_refused():
    state = SortLoader(6, batch_size=2, seed=1).state_dict()
    with pytest.raises(ValueError, match="another seed or sequence length"):
        SortLoader(7, batch_size=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="not a sort loader state"):
        SortLoader(6, batch_size=2, seed=1).load_state_dict({**state, "format": "x"})
    with pytest.raises(ValueError, match="at least 2 numbers"):
        SortLoader(1, batch_size=2)
