"""Q&A MNIST loss (answer ticks only) and accuracy by number of operations."""

import pytest
import torch
import torch.nn.functional as F

from ctm_dist.losses.qamnist import correct_by_operations, qamnist_loss


def test_loss_reads_only_the_answer_ticks():
    torch.manual_seed(0)
    predictions = torch.randn(4, 10, 9)
    certainties = torch.rand(4, 2, 9)
    targets = torch.tensor([1, 2, 3, 4])
    loss, tick = qamnist_loss(predictions, certainties, targets, answer_ticks=3)
    ce = torch.stack(
        [F.cross_entropy(predictions[..., t], targets, reduction="none") for t in range(6, 9)], 1
    )
    chosen = certainties[:, 1, 6:].argmax(1)
    rows = torch.arange(4)
    want = 0.5 * (ce.min(1).values + ce[rows, chosen])
    torch.testing.assert_close(loss, want.mean())
    assert torch.equal(tick, chosen)
    # changing a tick before the answer changes nothing
    predictions[..., :6] = 100.0
    assert torch.equal(qamnist_loss(predictions, certainties, targets, 3)[0], loss)
    last = qamnist_loss(predictions, certainties, targets, 3, use_most_certain=False)[1]
    assert last.tolist() == [2] * 4
    with pytest.raises(ValueError, match="answer_ticks"):
        qamnist_loss(predictions, certainties, targets, 10)


def test_correct_by_operations_counts_each_difficulty():
    answers = torch.zeros(4, 10, 2)
    answers[torch.arange(4), torch.tensor([3, 5, 3, 0]), 1] = 1.0
    targets = torch.tensor([3, 5, 4, 0])
    operations = torch.tensor([1, 2, 2, 4])
    tick = torch.ones(4, dtype=torch.long)
    correct, total = correct_by_operations(
        answers, targets, tick, operations, [1, 2, 3, 4], weight=torch.tensor([1.0, 1, 1, 0])
    )
    assert correct.tolist() == [1, 1, 0, 0] and total.tolist() == [1, 2, 0, 0]
