"""Adaptive-compute inference: each sample stops thinking once it is certain enough.

``predict`` runs the CTM tick by tick. A sample finishes at the first tick whose certainty
(1 - normalised entropy) reaches ``certainty_threshold``, or at the last tick. Finished samples
leave the batch, so later ticks really run on fewer samples, and the loop ends as soon as all
samples are done.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ctm_dist.model import CTM, ReadoutState, TickContext, TickState


class Prediction(NamedTuple):
    predictions: torch.Tensor  # [B, out_dims], from the tick each sample stopped at
    tick: torch.Tensor  # [B] index (0-based) of that tick; ticks computed = tick + 1
    certainty: torch.Tensor  # [B] certainty (1 - normalised entropy) at that tick


# per-sample tensors of a tick context: the attention's keys and values, the sort variant's input
PER_SAMPLE_CONTEXT = ("keys", "values", "input")


def _keep(
    state: TickState, ctx: TickContext, readout: ReadoutState, keep: torch.Tensor
) -> tuple[TickState, TickContext, ReadoutState]:
    """The samples in ``keep``; the beta sums are the same for every sample."""
    alpha_action = state.alpha_action
    state = state._replace(
        trace=state.trace[..., keep],
        activated=state.activated[keep],
        alpha_action=None if alpha_action is None else alpha_action[keep],
    )
    ctx = ctx._replace(
        **{name: getattr(ctx, name)[keep] for name in PER_SAMPLE_CONTEXT if hasattr(ctx, name)}
    )
    return state, ctx, readout._replace(alpha=readout.alpha[keep])


@torch.no_grad()
def predict(
    model: CTM, x: torch.Tensor, certainty_threshold: float, max_ticks: int | None = None
) -> Prediction:
    """Predictions with per-sample early stopping; see the module docstring.

    ``max_ticks`` defaults to the model's ``iterations``. The model's train/eval mode is the
    caller's choice (use ``model.eval()`` for batch-norm statistics and no dropout).
    """
    max_ticks = model.cfg.iterations if max_ticks is None else int(max_ticks)
    if max_ticks < 1:
        raise ValueError(f"max_ticks must be >= 1, got {max_ticks}")
    state, ctx = model.start(x)
    b = x.size(0)
    device = state.activated.device
    predictions = torch.empty(b, model.cfg.out_dims, device=device)
    ticks = torch.full((b,), max_ticks - 1, dtype=torch.long, device=device)
    certainty = torch.empty(b, device=device)
    active = torch.arange(b, device=device)
    readout_state = None

    for t in range(max_ticks):
        state, out = model.tick(state, ctx)
        readout = model.read_out(out.post_activation.unsqueeze(0), ctx, readout_state)
        readout_state = readout.state
        prediction, tick_certainty = readout.predictions[0], readout.certainties[0, :, 1]
        done = tick_certainty >= certainty_threshold
        if t == max_ticks - 1:
            done = torch.ones_like(done)
        finished = active[done]
        predictions[finished] = prediction[done].float()
        certainty[finished] = tick_certainty[done].float()
        ticks[finished] = t
        if bool(done.all()):
            break
        keep = ~done
        active = active[keep]
        if not bool(done.any()):
            continue
        state, ctx, readout_state = _keep(state, ctx, readout_state, keep)
    return Prediction(predictions, ticks, certainty)
