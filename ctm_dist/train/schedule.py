"""Learning-rate schedule: linear warmup, then cosine decay (the reference's warmup+cosine), a
linear decay (the reference's RL ``--anneal_lr``) or a constant.

The schedule is a picklable callable for ``torch.optim.lr_scheduler.LambdaLR`` so its state
travels inside DeepSpeed checkpoints. It returns the factor applied to the base lr.
"""

from __future__ import annotations

import math


class WarmupCosine:
    """lr(step): ``start -> base`` linearly over ``warmup`` steps, then cosine (or, with ``linear``,
    straight) ``base -> min`` until ``total``; ``base`` throughout when neither."""

    linear = False  # schedules saved before the option existed restore as they were

    def __init__(
        self,
        base_lr: float,
        warmup: int,
        total: int,
        start_lr: float = 0.0,
        min_lr: float = 0.0,
        cosine: bool = True,
        linear: bool = False,
    ):
        self.base_lr, self.warmup, self.total = base_lr, warmup, max(total, 1)
        self.start_lr, self.min_lr, self.cosine = start_lr, min_lr, cosine
        self.linear = linear

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.start_lr + (self.base_lr - self.start_lr) * step / self.warmup
        if not (self.cosine or self.linear):
            return self.base_lr
        span = max(self.total - self.warmup, 1)
        progress = min(max(step - self.warmup, 0) / span, 1.0)
        if self.linear:
            return self.min_lr + (self.base_lr - self.min_lr) * (1.0 - progress)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )

    def __call__(self, step: int) -> float:
        return self.lr(step) / self.base_lr
