"""Q&A MNIST data: the IDX reader, the digit shard writer and the on-the-fly question loader."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from ctm_dist.data.idx import IDXError, read_idx, read_mnist
from ctm_dist.data.qamnist import DigitPool, QAMNISTLoader, make_question
from ctm_dist.data.qamnist_writer import mnist_splits, sklearn_digits_splits, write_qamnist_shards
from ctm_dist.data.writer import run_script
from datasets.qamnist import main as qamnist_main


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = b"\x00\x00" + bytes([type_code, array.ndim])
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def labelled_images(labels: np.ndarray, size: int = 6) -> np.ndarray:
    """Images whose every pixel is 20 * label, so a batch's digits can be read back from its input."""
    return np.repeat((labels * 20).astype(np.uint8)[:, None, None], size * size, 1).reshape(
        len(labels), size, size
    )


def write_mnist(directory, n_train=40, n_test=12, gz=True, size=6):
    rng = np.random.default_rng(0)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        for kind, array in (
            ("images-idx3", labelled_images(labels, size)),
            ("labels-idx1", labels),
        ):
            name = f"{stem}-{kind}-ubyte"
            data = idx_bytes(array)
            if gz:
                (directory / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (directory / name).write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_read_back(tmp_path, gz):
    write_mnist(tmp_path, gz=gz)
    images, labels = read_mnist(tmp_path, "train")
    assert images.shape == (40, 6, 6) and images.dtype == np.uint8 and labels.shape == (40,)
    assert np.array_equal(images[:, 0, 0], (labels * 20).astype(np.uint8))
    wide = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    (tmp_path / "ints").write_bytes(idx_bytes(wide, 0x0C))
    assert np.array_equal(read_idx(tmp_path / "ints"), wide)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: d[:-3], "truncated"),
        (lambda d: d + b"\x00", "longer than its header says"),
        (lambda d: b"\x01\x02" + d[2:], "not an IDX file"),
        (lambda d: d[:2] + b"\x07" + d[3:], "unknown IDX type code 0x07"),
        (lambda d: b"", "not an IDX file"),
        (lambda d: gzip.compress(d)[:-10], "not a readable gzip file"),
    ],
)
def test_corrupt_idx_gives_one_clear_line(tmp_path, corrupt, message):
    data = idx_bytes(np.zeros((3, 4, 4), np.uint8))
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(corrupt(data))
    with pytest.raises(IDXError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_inconsistent_mnist_files_are_refused(tmp_path):
    write_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(11, 3, np.uint8)))
    with pytest.raises(IDXError, match="holds 12 images but .* holds 11 labels"):
        read_mnist(tmp_path, "test")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(12, 12, np.uint8)))
    with pytest.raises(IDXError, match="labels must be digits 0-9, found 12"):
        read_mnist(tmp_path, "test")


def test_script_ends_bad_input_with_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        run_script(lambda: qamnist_main(["--mnist", str(tmp_path), "--out", str(tmp_path / "o")]))
    message = str(exited.value.code)
    assert message.startswith("error: ") and "no train-images-idx3-ubyte" in message
    assert "\n" not in message


def test_mnist_writer_and_pool_round_trip(tmp_path):
    (tmp_path / "mnist").mkdir()
    write_mnist(tmp_path / "mnist")
    out = tmp_path / "shards"
    indexes = write_qamnist_shards(
        out, mnist_splits(tmp_path / "mnist"), "mnist", samples_per_shard=16
    )
    assert {k: v.num_samples for k, v in indexes.items()} == {"train": 40, "val": 12}
    assert indexes["train"].meta["image_size"] == 32 and indexes["train"].task == "qamnist"
    images, labels = read_mnist(tmp_path / "mnist", "test")
    pool = DigitPool.read(str(out), "val")
    assert np.array_equal(pool.images, images) and np.array_equal(pool.labels, labels)


def test_sklearn_digits_are_kept_at_8x8(tmp_path):
    splits = sklearn_digits_splits(seed=3)
    assert splits["train"][0].shape[1:] == (8, 8) and len(splits["val"][0]) == 359
    assert splits["train"][0].max() == 255


def pool_of(n=30, seed=0):
    labels = np.random.default_rng(seed).integers(0, 10, n)
    return DigitPool(labelled_images(labels), labels, {"image_size": 6})


def answer_of(x: torch.Tensor, question: torch.Tensor, repeats: int) -> int:
    """The answer recomputed from a sample's input (pixels hold 20 * label) and question codes."""
    labels = [int(round(v * 255)) // 20 for v in x[::repeats, 0, 0, 0].tolist()]
    parts = question[::repeats].tolist()
    value = labels[parts[0]]
    for op, index in zip(parts[1::2], parts[2::2]):
        value = (value + labels[index]) % 10 if op == -1 else (value - labels[index]) % 10
    return value


def test_questions_and_answers_are_right():
    loader = QAMNISTLoader(pool_of(), batch_size=8, seed=1, repeats=2, samples_per_epoch=64)
    seen_ops = set()
    for batch in loader:
        b, ticks = batch["input"].shape[:2]
        digits, ops = int(batch["digits"][0]), int(batch["operations"][0])
        seen_ops.add(ops)
        assert ticks == digits * 2 and batch["question"].shape == (b, (1 + 2 * ops) * 2)
        codes = batch["question"][:, ::2]
        assert ((codes[:, 0::2] >= 0) & (codes[:, 0::2] < digits)).all()
        assert set(codes[:, 1::2].unique().tolist()) <= {-1, -2}
        for i in range(b):
            assert answer_of(batch["input"][i], batch["question"][i], 2) == batch["target"][i]
    assert seen_ops <= {1, 2, 3, 4} and len(seen_ops) > 1  # the reference's [1, 5)


def test_stream_is_fixed_by_seed_and_split_by_rank():
    def batches(**kw):
        return list(QAMNISTLoader(pool_of(), seed=5, repeats=1, samples_per_epoch=48, **kw))

    whole = batches(batch_size=8)
    again = batches(batch_size=8)
    ranks = [batches(batch_size=4, rank=r, world_size=2) for r in (0, 1)]
    other = list(QAMNISTLoader(pool_of(), seed=6, repeats=1, samples_per_epoch=48, batch_size=8))
    assert len(whole) == 6 and all(len(r) == 6 for r in ranks)
    for w, a, r0, r1, o in zip(whole, again, *ranks, other):
        for key in ("input", "question", "target"):
            assert torch.equal(w[key], a[key])
            assert torch.equal(w[key], torch.cat((r0[key], r1[key])))
    assert any(not torch.equal(w["target"], o["target"]) for w, o in zip(whole, other))


def test_resume_continues_the_stream():
    def loader():
        return QAMNISTLoader(pool_of(), batch_size=4, seed=2, repeats=1, samples_per_epoch=40)

    full = [b["target"] for b in loader()]
    first = loader()
    it = iter(first)
    head = [next(it)["target"] for _ in range(3)]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    rest = [b["target"] for b in resumed]
    assert all(torch.equal(a, b) for a, b in zip(head + rest, full)) and len(head + rest) == 10
    changed = QAMNISTLoader(pool_of(), batch_size=4, seed=3, repeats=1, samples_per_epoch=40)
    with pytest.raises(ValueError, match="another stream"):
        changed.load_state_dict(first.state_dict())


def test_evaluation_cycles_through_every_operation_count():
    loader = QAMNISTLoader(
        pool_of(), batch_size=2, repeats=1, samples_per_epoch=16, cycle_operations=True
    )
    assert [int(b["operations"][0]) for b in loader] == [1, 2, 3, 4] * 2


def test_make_question_matches_the_reference_rule():
    rng = np.random.default_rng(0)
    codes, answer = make_question(rng, np.array([7, 5]), operations=3, repeats=1)
    value = [7, 5][codes[0]]
    for op, index in zip(codes[1::2], codes[2::2]):
        value = (value + [7, 5][index]) % 10 if op == -1 else (value - [7, 5][index]) % 10
    assert answer == value and len(codes) == 7
