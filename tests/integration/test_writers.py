"""Shard writers (demo, CIFAR-10, ImageNet, the shared writer) against the real local S3 server."""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from writers_fixtures import decode, doc, load_script, read_shard_set, shard_bytes

from ctm_dist.data.cifar10_writer import write_cifar10_shards
from ctm_dist.data.demo_writer import write_demo_shards
from ctm_dist.data.imagenet_writer import write_imagenet_shards
from ctm_dist.data.index import FORMAT, ShardIndex, ShardInfo, read_index
from ctm_dist.data.transforms import random_resized_crop
from ctm_dist.data.writer import ShardSetWriter
from ctm_dist.storage import Location

# ---------------------------------------------------------------- the shared writer and index


def test_index_is_written_last_and_stale_shards_go(object_store, s3_location):
    def samples(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise RuntimeError("source broke")
            yield {"__key__": f"k{i}", "txt": f"sample {i}".encode()}

    with ShardSetWriter(s3_location, "train", "test", 3) as writer:
        for s in samples(7):
            writer.write(s)
    assert read_index(s3_location, "train").num_samples == 7
    assert s3_location.list() == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "train.json",
    ]

    # a failing rewrite: the old index is gone at once, the new one never appears
    with pytest.raises(RuntimeError, match="source broke"):
        with ShardSetWriter(s3_location, "train", "test", 3) as writer:
            for s in samples(7, fail_at=4):
                writer.write(s)
    assert "train.json" not in s3_location.list()
    with pytest.raises(FileNotFoundError, match="missing or incomplete"):
        read_index(s3_location, "train")

    # a smaller rewrite removes the shards the new index does not list
    with ShardSetWriter(s3_location, "train", "test", 2, meta={"x": 1}) as writer:
        for s in samples(3):
            writer.write(s)
    index, got = read_shard_set(s3_location, "train")
    assert [s.samples for s in index.shards] == [2, 1] and index.meta == {"x": 1}
    assert [g["txt"] for g in got.values()] == [b"sample 0", b"sample 1", b"sample 2"]
    assert s3_location.list() == ["train-000000.tar", "train-000001.tar", "train.json"]


def test_writer_refuses_bad_keys_and_empty_sets(tmp_path):
    with pytest.raises(ValueError, match="dot"):
        with ShardSetWriter(tmp_path, "s", "t", 4) as w:
            w.write({"__key__": "a.b", "txt": b"x"})
    with pytest.raises(ValueError, match="duplicate"):
        with ShardSetWriter(tmp_path, "s", "t", 4) as w:
            w.write({"__key__": "a", "txt": b"x"})
            w.write({"__key__": "a", "txt": b"y"})
    with pytest.raises(ValueError, match="no samples"):
        with ShardSetWriter(tmp_path, "s", "t", 4):
            pass
    assert not (tmp_path / "s.json").exists()


def test_index_json_matches_the_contract():
    index = ShardIndex(
        task="imagenet",
        split="train",
        meta={"num_classes": 10},
        shards=[ShardInfo("train-000000.tar", 256), ShardInfo("train-000001.tar", 10)],
    )
    text = index.to_json()
    d = json.loads(text)
    assert d == {
        "format": FORMAT,
        "task": "imagenet",
        "split": "train",
        "num_samples": 266,
        "shards": [
            {"name": "train-000000.tar", "samples": 256},
            {"name": "train-000001.tar", "samples": 10},
        ],
        "meta": {"num_classes": 10},
    }
    assert ShardIndex.from_json(text) == index
    d["num_samples"] = 5
    with pytest.raises(ValueError, match="inconsistent"):
        ShardIndex.from_json(json.dumps(d))


# ---------------------------------------------------------------- demo


def _nearest_mean_accuracy(train, val):
    def normalise(x):
        x = x.reshape(len(x), -1).astype(np.float32)
        return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)

    (xt, yt), (xv, yv) = (normalise(train[0]), train[1]), (normalise(val[0]), val[1])
    means = np.stack([xt[yt == c].mean(0) for c in range(10)])
    return ((xv @ means.T).argmax(1) == yv).mean()


def test_demo_shards_round_trip_are_learnable_and_deterministic(
    object_store, s3_location, tmp_path
):
    indexes = write_demo_shards(s3_location.child("a"), seed=0, samples_per_shard=512)
    assert set(indexes) == {"train", "val"}
    sources, data = {}, {}
    for split in ("train", "val"):
        index, samples = read_shard_set(s3_location.child("a"), split)
        assert (
            index.task == "demo"
            and index.meta["image_size"] == 32
            and index.meta["num_classes"] == 10
        )
        assert all(s.samples <= 512 for s in index.shards)
        sources[split] = {doc(s)["source"] for s in samples.values()}
        images = [decode(s["png"]) for s in samples.values()]
        assert all(im.size == (32, 32) and im.mode == "RGB" for im in images)
        data[split] = (
            np.stack([np.asarray(im.convert("L")) for im in images]),
            np.array([int(s["cls"]) for s in samples.values()]),
        )
    assert (
        len(sources["train"]) + len(sources["val"]) == 1797
        and not sources["train"] & sources["val"]
    )
    assert 0.75 < len(sources["train"]) / 1797 < 0.85
    assert set(data["train"][1]) == set(data["val"][1]) == set(range(10))
    # the jitter keeps digits learnable: nearest class mean on pixels is far above chance (0.1)
    assert _nearest_mean_accuracy(data["train"], data["val"]) > 0.6

    # same seed: the same bytes (a local copy is enough to compare); another seed: other images
    local_b, local_c = Location.parse(tmp_path / "b"), Location.parse(tmp_path / "c")
    write_demo_shards(local_b, seed=0, splits=("val",), samples_per_shard=512)
    write_demo_shards(local_c, seed=1, splits=("val",), samples_per_shard=512)
    assert shard_bytes(s3_location.child("a"), "val") == shard_bytes(local_b, "val")
    assert shard_bytes(s3_location.child("a"), "val") != shard_bytes(local_c, "val")
    assert local_c.list() == ["val-000000.tar", "val.json"]


# ---------------------------------------------------------------- CIFAR-10


def _fake_cifar(folder, per_batch=6):
    rng = np.random.default_rng(0)
    folder.mkdir()
    truth = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        files = [f"{name}_img{i}.png".encode() for i in range(per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    b"batch_label": name.encode(),
                    b"labels": labels,
                    b"data": data,
                    b"filenames": files,
                },
                f,
            )
        for i, fn in enumerate(files):
            truth[fn.decode()] = (data[i].reshape(3, 32, 32).transpose(1, 2, 0), labels[i])
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(
            {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}, f
        )
    return truth


def test_cifar10_round_trip_lossless(object_store, s3_location, tmp_path):
    truth = _fake_cifar(tmp_path / "cifar-10-batches-py")
    source = str(tmp_path / "cifar-10-batches-py")
    write_cifar10_shards(s3_location, source, "train", seed=2, samples_per_shard=8, progress=False)
    write_cifar10_shards(s3_location, source, "test", seed=2, samples_per_shard=8, progress=False)
    index, samples = read_shard_set(s3_location, "train")
    assert (
        index.num_samples == 30
        and index.meta["classes"][3] == "class3"
        and index.meta["image_size"] == 32
    )
    assert {doc(s)["batch"] for s in samples.values()} == {f"data_batch_{i}" for i in range(1, 6)}
    for s in samples.values():
        image, label = truth[doc(s)["source"]]
        assert int(s["cls"]) == label
        assert np.array_equal(np.asarray(decode(s["png"])), image)
    order = [doc(s)["source"] for s in samples.values()]
    assert order != sorted(
        order, key=lambda n: (n.split("_img")[0], int(n.split("_img")[1][:-4]))
    ), "shuffled"
    index, samples = read_shard_set(s3_location, "test")
    assert index.num_samples == 6 and {doc(s)["batch"] for s in samples.values()} == {"test_batch"}
    before = shard_bytes(s3_location, "train")
    write_cifar10_shards(s3_location, source, "train", seed=2, samples_per_shard=8, progress=False)
    assert shard_bytes(s3_location, "train") == before


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_refuses_pickles_with_code(tmp_path):
    _fake_cifar(tmp_path / "c")
    with open(tmp_path / "c" / "data_batch_3", "wb") as f:
        pickle.dump({b"labels": [], b"data": _Evil()}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        write_cifar10_shards(tmp_path / "out", str(tmp_path / "c"), "train", progress=False)
    assert not (tmp_path / "out" / "train.json").exists()


# ---------------------------------------------------------------- ImageNet

WNIDS = ["n01440764", "n01443537", "n02085620"]  # sorted order = class index


def _jpeg(path, size, colour, mode="RGB", fmt="JPEG"):
    Image.new(mode, size, colour).save(path, format=fmt)


def _write_meta_mat(path, id_order):
    """A devkit meta.mat: leaf synsets with their ILSVRC2012_ID, plus one inner node (not a class)."""
    from scipy.io import savemat

    rows = [(i + 1, w, 0) for i, w in enumerate(id_order)] + [(len(id_order) + 1, "n00001740", 3)]
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")]
    synsets = np.array(
        [
            (np.array([[i]], np.uint16), np.array([w]), np.array([[c]], np.uint8))
            for i, w, c in rows
        ],
        dtype=dtype,
    ).reshape(-1, 1)
    savemat(path, {"synsets": synsets})


def _fake_imagenet(root):
    """train/<wnid>/*.JPEG (one CMYK, one PNG in disguise, one corrupt) and flat val/ + devkit."""
    for c, wnid in enumerate(WNIDS):
        os.makedirs(root / "train" / wnid)
        for i in range(3):
            _jpeg(
                root / "train" / wnid / f"{wnid}_{i}.JPEG",
                (40 + 8 * i, 24 + 4 * c),
                (80 * c, 60 * i, 90),
            )
    _jpeg(
        root / "train" / WNIDS[0] / f"{WNIDS[0]}_cmyk.JPEG", (30, 20), (0, 50, 100, 0), mode="CMYK"
    )
    _jpeg(root / "train" / WNIDS[1] / f"{WNIDS[1]}_png.JPEG", (20, 30), (10, 200, 10), fmt="PNG")
    (root / "train" / WNIDS[2] / f"{WNIDS[2]}_bad.JPEG").write_bytes(b"\xff\xd8 this is not a jpeg")
    os.makedirs(root / "val")
    val_labels = [2, 0, 1, 2, 1]
    for i, c in enumerate(val_labels):
        _jpeg(root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG", (32, 48), (80 * c, 0, 0))
    # devkit: ILSVRC2012_IDs are not in sorted-wnid order
    id_order = [WNIDS[2], WNIDS[0], WNIDS[1]]
    os.makedirs(root / "devkit" / "data")
    (root / "devkit" / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{id_order.index(WNIDS[c]) + 1}\n" for c in val_labels)
    )
    (root / "synsets.txt").write_text("".join(f"{w} some words\n" for w in id_order))
    _write_meta_mat(root / "devkit" / "data" / "meta.mat", id_order)
    (root / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        + "".join(
            f"ILSVRC2012_val_{i + 1:08d},{WNIDS[c]} 1 2 3 4\n" for i, c in enumerate(val_labels)
        )
    )
    return val_labels


def test_imagenet_train_round_trip_with_skips_and_resize(object_store, s3_location, tmp_path):
    _fake_imagenet(tmp_path)
    index, skipped = write_imagenet_shards(
        s3_location.child("a"), str(tmp_path), "train", seed=1, samples_per_shard=4, progress=False
    )
    assert len(skipped) == 1 and "_bad.JPEG" in skipped[0]
    index, samples = read_shard_set(s3_location.child("a"), "train")
    assert index.task == "imagenet" and index.num_samples == 11 and index.meta["skipped"] == 1
    assert index.meta["classes"] == WNIDS and index.meta["num_classes"] == 3
    for key, s in samples.items():
        d = doc(s)
        assert (
            set(s) == {"jpg", "cls", "json"}
            and key == os.path.splitext(os.path.basename(d["source"]))[0]
        )
        assert int(s["cls"]) == WNIDS.index(d["wnid"]) and d["source"].startswith(d["wnid"] + "/")
        im = decode(s["jpg"])
        assert im.format == "JPEG" and im.mode == "RGB"
        original = (tmp_path / "train" / d["source"]).read_bytes()
        if key.endswith(("_cmyk", "_png")):
            assert s["jpg"] != original
        else:
            assert s["jpg"] == original, "plain RGB JPEGs are stored unchanged"
    assert list(samples) != sorted(samples), "shuffled by seed"

    # resized, over two processes; the same call again gives the same bytes
    local = Location.parse(tmp_path / "out")
    for location, workers in ((s3_location.child("b"), 2), (local, 1)):
        write_imagenet_shards(
            location,
            str(tmp_path),
            "train",
            seed=1,
            resize_shorter=16,
            samples_per_shard=4,
            workers=workers,
            progress=False,
        )
    assert shard_bytes(s3_location.child("b"), "train") == shard_bytes(local, "train")
    index, samples = read_shard_set(s3_location.child("b"), "train")
    assert index.meta["image_size"] == 16
    for s in samples.values():
        assert min(decode(s["jpg"]).size) == 16


@pytest.mark.parametrize(
    "labelling", ["devkit_meta_mat", "devkit_synsets", "val_map", "class_folders"]
)
def test_imagenet_val_labels(object_store, s3_location, tmp_path, labelling):
    val_labels = _fake_imagenet(tmp_path)
    options = {}
    if labelling == "devkit_meta_mat":
        options = {"devkit": str(tmp_path / "devkit")}
    elif labelling == "devkit_synsets":
        options = {"devkit": str(tmp_path / "devkit"), "synsets": str(tmp_path / "synsets.txt")}
    elif labelling == "val_map":
        options = {"mapping": str(tmp_path / "LOC_val_solution.csv")}
    else:
        for i, c in enumerate(val_labels):
            name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
            os.makedirs(tmp_path / "val" / WNIDS[c], exist_ok=True)
            os.rename(tmp_path / "val" / name, tmp_path / "val" / WNIDS[c] / name)
    write_imagenet_shards(
        s3_location, str(tmp_path), "val", samples_per_shard=2, progress=False, **options
    )
    index, samples = read_shard_set(s3_location, "val")
    assert index.num_samples == 5 and index.meta["classes"] == WNIDS
    got = {k: int(s["cls"]) for k, s in samples.items()}
    assert got == {f"ILSVRC2012_val_{i + 1:08d}": c for i, c in enumerate(val_labels)}


def test_imagenet_flat_val_without_labels_fails_clearly(tmp_path):
    _fake_imagenet(tmp_path)
    with pytest.raises(ValueError, match="--devkit"):
        write_imagenet_shards(tmp_path / "out", str(tmp_path), "val", progress=False)


# ---------------------------------------------------------------- scripts


def test_scripts_write_to_s3_with_env_credentials(
    object_store, s3_bucket, s3_env, tmp_path, capsys
):
    _fake_imagenet(tmp_path / "imagenet")
    _fake_cifar(tmp_path / "cifar")
    url = f"s3://{s3_bucket}"
    common = ["--seed", "4", "--samples-per-shard", "5", "--no-progress"]
    assert (
        load_script("imagenet").main(
            [
                "--root",
                str(tmp_path / "imagenet"),
                "--split",
                "val",
                "--out",
                f"{url}/in",
                "--val-map",
                str(tmp_path / "imagenet" / "LOC_val_solution.csv"),
                "--resize-shorter",
                "8",
                *common,
            ]
        )
        == 0
    )
    assert (
        load_script("cifar10").main(
            [
                "--source",
                str(tmp_path / "cifar"),
                "--split",
                "train",
                "--out",
                f"{url}/c10",
                *common,
            ]
        )
        == 0
    )
    assert (
        load_script("demo").main(
            [
                "--out",
                f"{url}/demo",
                "--split",
                "val",
                "--samples-per-shard",
                "400",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "wrote 5 samples in 1 shards" in out and "wrote 30 samples in 6 shards" in out
    assert read_index(Location.parse(f"{url}/in"), "val").meta["image_size"] == 8
    assert read_index(Location.parse(f"{url}/c10"), "train").num_samples == 30
    assert read_index(Location.parse(f"{url}/demo"), "val").num_samples == 359
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in out


@pytest.mark.parametrize(
    "shards, fragment",
    [
        ([ShardInfo("a.tar", -1)], "'a.tar' has samples=-1"),
        ([ShardInfo("a.tar", 2.5)], "'a.tar' has samples=2.5"),
        ([ShardInfo("a.tar", True)], "'a.tar' has samples=True"),
        ([ShardInfo("a.tar", 1), ShardInfo("a.tar", 1)], "lists 'a.tar' twice"),
    ],
)
def test_index_with_impossible_counts_is_neither_written_nor_read(shards, fragment):
    index = ShardIndex(task="demo", split="train", shards=shards)
    with pytest.raises(ValueError, match=fragment):
        index.to_json()
    doc = {
        "format": FORMAT,
        "task": "demo",
        "split": "train",
        "meta": {},
        "shards": [{"name": s.name, "samples": s.samples} for s in shards],
        "num_samples": sum(s.samples for s in shards),
    }
    with pytest.raises(ValueError, match=fragment):
        ShardIndex.from_json(json.dumps(doc))


def test_random_resized_crop_of_drafted_jpegs_never_leaves_the_image():
    """JPEG draft scaling rounds each side up on its own, so the crop box is scaled per axis: with
    one factor for both, crops near the bottom edge of odd-sized images fell outside the decoded
    image and the sample was skipped."""
    rng = np.random.default_rng(0)
    for width, height in ((500, 375), (333, 501), (97, 203)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG")
        for _ in range(100):
            img = Image.open(io.BytesIO(buf.getvalue()))
            assert random_resized_crop(img, 32, rng).size == (32, 32)
