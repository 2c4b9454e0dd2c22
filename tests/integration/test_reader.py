"""ShardLoader / ParityLoader against shard sets on the real local S3 server (keys enforced)."""

from __future__ import annotations

import io
import json
import struct
import uuid
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from ctm_dist.data.decode import MAX_PIXELS, ImageTooLarge, make_decoder
from ctm_dist.data.parity import ParityLoader
from ctm_dist.data.reader import DataError, ShardLoader, merge_states
from ctm_dist.data.writer import ShardSetWriter
from ctm_dist.storage import Location, StorageAccessDenied, StorageNotFound

NUM = 59  # 6 shards of 9 and one of 5: uneven on purpose
PER_SHARD = 9
SIZE = 12


def _png(rng, label: int) -> bytes:
    arr = rng.integers(0, 255, (14, 14, 3), dtype=np.uint8)
    arr[0, 0] = label * 20
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write(loc: Location, split: str, samples: list[dict], per_shard: int = PER_SHARD) -> None:
    meta = {"num_classes": 10, "classes": [str(i) for i in range(10)], "image_size": SIZE}
    with ShardSetWriter(loc, split, "demo", per_shard, meta) as w:
        for s in samples:
            w.write(s)


def _samples(n: int, prefix: str = "s") -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "__key__": f"{prefix}{i:04d}",
            "png": _png(rng, i % 10),
            "cls": str(i % 10).encode(),
            "json": b"{}",
        }
        for i in range(n)
    ]


def _bucket_location(store, name: str) -> Location:
    bucket = f"reader-{name}-{uuid.uuid4().hex[:8]}"
    store.create_bucket(bucket)
    return Location.parse(
        f"s3://{bucket}/shards",
        endpoint_url=store.endpoint_url,
        key=store.access_key,
        secret=store.secret_key,
        retry_deadline=10,
    )


@pytest.fixture(scope="module")
def shards(object_store):
    loc = _bucket_location(object_store, "main")
    _write(loc, "train", _samples(NUM))
    return loc


def _loader(loc, rank=0, world=1, workers=0, seed_epoch=0, **kw):
    kw.setdefault("batch_size", 4)
    loader = ShardLoader(
        loc, "train", rank=rank, world_size=world, num_workers=workers, seed=3, **kw
    )
    loader.set_epoch(seed_epoch)
    return loader


def _take(loader, n=None):
    """(keys of each batch, inputs of each batch) for up to n batches."""
    keys, inputs = [], []
    for i, b in enumerate(loader):
        assert b["input"].shape == (loader.batch_size, 3, SIZE, SIZE)
        assert b["valid"].dtype == torch.bool and len(b["key"]) == loader.batch_size
        keys.append([k for k, v in zip(b["key"], b["valid"].tolist()) if v])
        inputs.append(b["input"])
        if n is not None and i + 1 == n:
            break
    return keys, inputs


def _flat(batches):
    return [k for b in batches for k in b]


ALL_KEYS = sorted(f"s{i:04d}" for i in range(NUM))


@pytest.fixture(scope="module")
def reference(shards):
    """Epoch 0 of a 2-rank x 2-worker job, read without interruption: (loaders, runs)."""
    loaders = [_loader(shards, r, 2, 2) for r in range(2)]
    lengths = [len(ldr) for ldr in loaders]
    runs = [_take(ldr) for ldr in loaders]
    return loaders, lengths, runs


def test_two_ranks_two_workers_cover_epoch_exactly_once(shards, reference):
    loaders, lengths, runs = reference
    assert lengths[0] == lengths[1]
    assert [len(k) for k, _ in runs] == lengths  # same number of batches on every rank
    seen = _flat(runs[0][0]) + _flat(runs[1][0])
    assert sorted(seen) == ALL_KEYS
    assert loaders[0].stats["samples"] + loaders[1].stats["samples"] == NUM
    # a second epoch is shuffled differently but again complete
    again = [_take(_loader(shards, r, 2, 2, seed_epoch=1))[0] for r in range(2)]
    assert sorted(_flat(again[0]) + _flat(again[1])) == ALL_KEYS
    assert again[0] != runs[0][0]


def test_resume_mid_epoch_yields_exactly_the_rest_in_order(shards, reference):
    _, _, ref = reference
    first = [_loader(shards, r, 2, 2) for r in range(2)]
    k = 3
    for ldr in first:
        _take(ldr, k)
    state = merge_states([ldr.state_dict() for ldr in first])
    json.dumps(state)  # plain data: storable in a checkpoint
    for r in range(2):
        resumed = _loader(shards, r, 2, 2)
        resumed.load_state_dict(state)
        assert len(resumed) == len(ref[r][0]) - k
        keys, inputs = _take(resumed)
        assert keys == ref[r][0][k:]
        for a, b in zip(inputs, ref[r][1][k:]):
            assert torch.equal(a, b)  # augmentation replays too


def test_state_after_last_batch_resumes_with_next_epoch(shards, tmp_path):
    local = Location.parse(tmp_path / "set")
    _write(local, "train", _samples(NUM))
    ldr = _loader(local)
    n = len(ldr)
    for _, _b in zip(range(n), ldr):  # the trainer stops right after the last batch
        pass
    state = merge_states([ldr.state_dict()])
    resumed = _loader(local)
    resumed.load_state_dict(state)
    assert len(resumed) == n
    keys = _flat(_take(resumed)[0])
    assert sorted(keys) == ALL_KEYS and resumed.epoch == 2
    second = _loader(local, seed_epoch=1)
    assert keys == _flat(_take(second)[0])  # exactly epoch 1 of an uninterrupted run


def test_unmerged_state_is_refused(shards):
    ldr = _loader(shards, 0, 2, 1)
    _take(ldr, 1)
    with pytest.raises(ValueError, match="merge_states"):
        _loader(shards, 0, 2, 1).load_state_dict(ldr.state_dict())


@pytest.mark.parametrize("new_world,new_workers", [(3, 1), (1, 0)])
def test_resume_with_another_world_size_covers_rest_once(shards, new_world, new_workers):
    first = [_loader(shards, r, 2, 2) for r in range(2)]
    before = []
    for ldr in first:
        before += _flat(_take(ldr, 2)[0])
    state = merge_states([ldr.state_dict() for ldr in first])
    resumed = [_loader(shards, r, new_world, new_workers) for r in range(new_world)]
    for ldr in resumed:
        ldr.load_state_dict(state)
    assert len({len(ldr) for ldr in resumed}) == 1
    after = []
    for ldr in resumed:
        after += _flat(_take(ldr)[0])
    assert sorted(before + after) == ALL_KEYS
    assert all(ldr.epoch == 1 for ldr in resumed)


def test_local_directory_and_eval_order(shards, tmp_path):
    local = Location.parse(tmp_path / "set")
    _write(local, "train", _samples(NUM))
    ldr = _loader(local, train=False, image_size=SIZE)
    keys, inputs = _take(ldr)
    assert _flat(keys) == ALL_KEYS  # eval: no shuffle, index order
    s3 = _loader(shards, train=False, image_size=SIZE)
    _, s3_inputs = _take(s3)
    assert all(torch.equal(a, b) for a, b in zip(inputs, s3_inputs))
    # more ranks than shards: idle ranks yield masked batches in step with the others
    many = [_loader(local, r, 9, 0) for r in range(9)]
    runs = [_take(ldr)[0] for ldr in many]
    assert len({len(r) for r in runs}) == 1 and any(not _flat(r) for r in runs)
    assert sorted(k for r in runs for k in _flat(r)) == ALL_KEYS


def test_wrong_keys_missing_bucket_index_and_shard_fail_clearly(object_store, shards):
    wrong = "not-the-secret-" + uuid.uuid4().hex
    bad = Location.parse(
        shards.url,
        endpoint_url=object_store.endpoint_url,
        key=object_store.access_key,
        secret=wrong,
    )
    with pytest.raises(StorageAccessDenied, match="access denied") as info:
        ShardLoader(bad, "train", batch_size=4)
    assert wrong not in str(info.value) and object_store.secret_key not in str(info.value)
    nobucket = Location.parse(
        "s3://no-bucket-for-reader/x",
        endpoint_url=object_store.endpoint_url,
        key=object_store.access_key,
        secret=object_store.secret_key,
    )
    with pytest.raises(StorageNotFound, match="bucket does not exist"):
        ShardLoader(nobucket, "train", batch_size=4)
    with pytest.raises(FileNotFoundError, match="val.json"):
        ShardLoader(shards, "val", batch_size=4)
    loc = _bucket_location(object_store, "gone")
    _write(loc, "train", _samples(20))
    loc.rm("train-000001.tar")
    with pytest.raises(StorageNotFound, match="train-000001.tar"):
        ShardLoader(loc, "train", batch_size=4)


def test_corrupt_samples_are_skipped_and_counted_or_raise_in_strict(object_store):
    loc = _bucket_location(object_store, "bad")
    samples = _samples(20)
    samples[3]["png"] = b"\x89PNG not really an image"
    samples[7]["cls"] = b"42"  # out of range for 10 classes
    del samples[11]["cls"]  # missing label
    _write(loc, "train", samples, per_shard=10)
    ldr = ShardLoader(loc, "train", batch_size=4, seed=1, num_workers=2)
    keys = _flat(_take(ldr)[0])
    assert sorted(keys) == sorted(
        s["__key__"] for i, s in enumerate(samples) if i not in (3, 7, 11)
    )
    assert (
        ldr.stats["skipped"] == 3
        and ldr.stats["skipped_bad_sample"] == 3
        and ldr.stats["samples"] == 17
    )
    assert any("s0003" in m and "undecodable" in m for m in ldr.skip_log)
    strict = ShardLoader(loc, "train", batch_size=4, seed=1, strict=True)
    with pytest.raises(DataError, match=r"train-00000\d\.tar key 's00(03|07|11)'"):
        _take(strict)


def test_truncated_tar_is_counted_or_raises_in_strict(object_store):
    loc = _bucket_location(object_store, "trunc")
    samples = _samples(20)
    _write(loc, "train", samples, per_shard=10)
    raw = loc.read_bytes("train-000001.tar")
    loc.write_bytes("train-000001.tar", raw[: len(raw) // 2 + 100])
    ldr = ShardLoader(loc, "train", batch_size=4, seed=1, train=False)
    keys = _flat(_take(ldr)[0])
    assert set(keys[:10]) == {s["__key__"] for s in samples[:10]}  # shard 0 intact
    assert 0 < len(keys) - 10 < 10  # part of shard 1 readable
    lost = ldr.stats["skipped_unreadable_tar"] + ldr.stats["skipped_missing"]
    assert lost == 20 - len(keys) and ldr.stats["samples"] == len(keys)
    strict = ShardLoader(loc, "train", batch_size=4, seed=1, train=False, strict=True)
    with pytest.raises(DataError, match="train-000001.tar"):
        _take(strict)


def _follow(image: torch.Tensor, route: torch.Tensor) -> bool:
    """Walk ``route`` from the red pixel over non-wall pixels; True if it ends on green."""
    img = image.permute(1, 2, 0)
    red = torch.nonzero((img == torch.tensor([1.0, -1.0, -1.0])).all(-1))
    green = torch.nonzero((img == torch.tensor([-1.0, 1.0, -1.0])).all(-1))
    assert len(red) == 1 and len(green) == 1
    y, x = red[0].tolist()
    steps = {0: (-1, 0), 1: (1, 0), 2: (0, -1), 3: (0, 1)}
    for move in route.tolist():
        if move == 4:
            continue
        dy, dx = steps[move]
        y, x = y + dy, x + dx
        if (img[y, x] == -1).all():  # black wall
            return False
    return [y, x] == green[0].tolist()


def test_maze_augmentation_keeps_the_route_valid():
    from ctm_dist.data.mazes_gen import generate_maze, pad_route

    decoder = make_decoder("mazes", train=True, meta={"route_length": 200, "image_size": 19})
    shapes = set()
    for seed in range(6):
        maze = generate_maze(19, seed)
        buf = io.BytesIO()
        Image.fromarray(maze.image).save(buf, format="PNG")
        sample = {
            "__key__": f"m{seed}",
            "png": buf.getvalue(),
            "json": json.dumps({"route": pad_route(maze.moves, 200), "route_length": 200}).encode(),
        }
        for aug in range(12):
            x, route = decoder(sample, np.random.default_rng([seed, aug]))
            assert x.shape == (3, 19, 19) and route.shape == (200,)
            assert _follow(x, route)
            shapes.add(tuple(route[:8].tolist()))
        # the unaugmented route works too, and a corrupted route is caught by the check
        plain = make_decoder("mazes", train=False, meta={"route_length": 200})
        x, route = plain(sample, np.random.default_rng(0))
        assert _follow(x, route)
        broken = route.clone()
        broken[route != 4] = torch.where(
            broken[route != 4] < 2, 1 - broken[route != 4], 5 - broken[route != 4]
        )
        assert not _follow(x, broken)
    assert len(shapes) > 6  # the augmentation actually varies


def test_parity_loader_deterministic_and_elastic():
    ref = [
        list(ParityLoader(16, batch_size=5, rank=r, world_size=2, seed=7, samples_per_epoch=53))
        for r in range(2)
    ]
    assert len(ref[0]) == len(ref[1]) == 6
    x, y = ref[0][0]["input"], ref[0][0]["target"]
    assert set(x.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(y, torch.cumsum((x == -1).long(), 1) % 2)
    all_keys = [k for r in ref for b in r for k, v in zip(b["key"], b["valid"].tolist()) if v]
    assert sorted(all_keys) == sorted(f"0/{i}" for i in range(53))
    # N=2 -> M=3 resume after two steps: the rest exactly once, same samples for the same keys
    first = [
        ParityLoader(16, batch_size=5, rank=r, world_size=2, seed=7, samples_per_epoch=53)
        for r in range(2)
    ]
    seen = {}
    for ldr in first:
        for _, b in zip(range(2), ldr):
            seen.update({k: row for k, row, v in zip(b["key"], b["input"], b["valid"]) if v})
    state = merge_states([ldr.state_dict() for ldr in first])
    for r in range(3):
        ldr = ParityLoader(16, batch_size=5, rank=r, world_size=3, seed=7, samples_per_epoch=53)
        ldr.load_state_dict(state)
        for b in ldr:
            for k, row, v in zip(b["key"], b["input"], b["valid"]):
                if v:
                    assert k not in seen
                    seen[k] = row
    assert sorted(seen) == sorted(f"0/{i}" for i in range(53))
    by_key = {k: row for r in ref for b in r for k, row in zip(b["key"], b["input"])}
    assert all(torch.equal(seen[k], by_key[k]) for k in seen)


# ---------------------------------------------------------------- an index that does not match its tars


def _lying_index(object_store, name: str, counts: list[int]) -> Location:
    """Two shards of 8 samples whose index claims ``counts`` instead (``num_samples`` kept consistent)."""
    loc = _bucket_location(object_store, name)
    _write(loc, "train", _samples(16), per_shard=8)
    doc = json.loads(loc.read_bytes("train.json"))
    for shard, n in zip(doc["shards"], counts):
        shard["samples"] = n
    doc["num_samples"] = sum(counts)
    loc.write_bytes("train.json", json.dumps(doc).encode())
    return loc


def test_index_count_the_tar_cannot_hold_fails_at_construction(object_store):
    loc = _lying_index(object_store, "huge", [100_000_000, 8])
    with pytest.raises(
        DataError, match=r"train-000000\.tar.*lists 100000000 samples.*hold at most \d+"
    ):
        ShardLoader(loc, "train", batch_size=4)


def test_negative_or_fractional_index_count_fails_at_construction(object_store):
    loc = _lying_index(object_store, "neg", [-8, 8])
    with pytest.raises(ValueError, match=r"'train-000000\.tar' has samples=-8"):
        ShardLoader(loc, "train", batch_size=4)
    doc = json.loads(loc.read_bytes("train.json"))
    doc["shards"][0]["samples"], doc["num_samples"] = 7.5, 15.5
    loc.write_bytes("train.json", json.dumps(doc).encode())
    with pytest.raises(ValueError, match=r"has samples=7\.5"):
        ShardLoader(loc, "train", batch_size=4)


def test_index_count_above_the_tar_is_a_counted_mismatch(object_store):
    loc = _lying_index(object_store, "high", [12, 8])
    ldr = ShardLoader(loc, "train", batch_size=4, seed=1, train=False)
    keys = _flat(_take(ldr)[0])
    assert sorted(keys) == sorted(f"s{i:04d}" for i in range(16))  # every real sample, once
    assert (
        ldr.stats["index_mismatch"] == 1
        and ldr.stats["skipped_missing"] == 4
        and ldr.stats["samples"] == 16
    )
    assert any(
        "train-000000.tar" in m and "ends after 8 samples" in m and "lists 12" in m
        for m in ldr.skip_log
    )
    with pytest.raises(DataError, match=r"train-000000\.tar: the tar ends after 8"):
        _take(ShardLoader(loc, "train", batch_size=4, seed=1, train=False, strict=True))


def test_index_count_below_the_tar_is_a_counted_mismatch(object_store):
    loc = _lying_index(object_store, "low", [5, 8])
    ldr = ShardLoader(loc, "train", batch_size=4, seed=1, num_workers=2)
    keys = _flat(_take(ldr)[0])
    assert len(keys) == 13 and len(set(keys)) == 13
    assert ldr.stats["index_mismatch"] == 1 and ldr.stats["skipped_unindexed"] == 3
    assert ldr.stats["skipped"] == 3 and ldr.stats["samples"] == 13
    assert any(
        "train-000000.tar" in m and "holds 3 sample(s) past the 5" in m for m in ldr.skip_log
    )
    with pytest.raises(DataError, match=r"train-000000\.tar: the tar holds 3 sample\(s\) past"):
        _take(ShardLoader(loc, "train", batch_size=4, seed=1, strict=True))


# ---------------------------------------------------------------- decompression bombs


def _blank_png(width: int, height: int) -> bytes:
    """A valid all-black greyscale PNG, compressed row by row (a few hundred bytes per megapixel)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


@pytest.mark.filterwarnings(
    "ignore::PIL.Image.DecompressionBombWarning"
)  # Pillow warns, the decoder refuses
def test_a_144_megapixel_png_of_140kb_is_refused_before_decoding():
    bomb = _blank_png(12000, 12000)
    assert len(bomb) < 200_000
    sample = {
        "__key__": "bomb",
        "png": bomb,
        "cls": b"1",
        "json": json.dumps({"route": [0, 1], "route_length": 2}).encode(),
    }
    for task in ("imagenet", "mazes", "demo", "cifar10"):
        for train in (True, False):
            decoder = make_decoder(task, train, {"num_classes": 10})
            with pytest.raises(
                ImageTooLarge,
                match=f"12000x12000 = 144000000 pixels is over the limit of {MAX_PIXELS[task]}",
            ):
                decoder(sample, np.random.default_rng(0))


def test_images_over_the_task_pixel_limit_are_skipped_and_counted(object_store):
    loc = _bucket_location(object_store, "bomb")
    samples = _samples(12)
    samples[5]["png"] = _blank_png(1100, 1000)  # 1.1 megapixels: over demo's limit, 2 KB on disk
    _write(loc, "train", samples, per_shard=6)
    ldr = ShardLoader(loc, "train", batch_size=4, seed=1)
    keys = _flat(_take(ldr)[0])
    assert sorted(keys) == sorted(s["__key__"] for i, s in enumerate(samples) if i != 5)
    assert (
        ldr.stats["skipped"] == 1
        and ldr.stats["skipped_image_too_large"] == 1
        and ldr.stats["samples"] == 11
    )
    assert any("s0005" in m and "1100x1000" in m for m in ldr.skip_log)
    # the limit can be raised for a shard set of larger images
    roomy = ShardLoader(loc, "train", batch_size=4, seed=1, max_pixels=2_000_000)
    assert len(_flat(_take(roomy)[0])) == 12 and roomy.stats["skipped"] == 0
    with pytest.raises(DataError, match="s0005.*over the limit"):
        _take(ShardLoader(loc, "train", batch_size=4, seed=1, strict=True))


# ---------------------------------------------------------------- one global order for every world size


def _global_steps(shards, world: int, global_batch: int, steps=None, state=None, workers: int = 0):
    """Per step, the set of keys of the union of every rank's batch (and the loaders)."""
    loaders = [
        _loader(shards, r, world, workers, batch_size=global_batch // world, global_order=True)
        for r in range(world)
    ]
    if state is not None:
        for ldr in loaders:
            ldr.load_state_dict(state)
    assert len({len(ldr) for ldr in loaders}) == 1
    runs = [_take(ldr, steps)[0] for ldr in loaders]
    assert len({len(r) for r in runs}) == 1
    return [set().union(*(run[k] for run in runs)) for k in range(len(runs[0]))], loaders


def test_global_batches_hold_the_same_samples_for_every_world_size(shards):
    ref, _ = _global_steps(shards, 1, 12)
    assert sorted(k for step in ref for k in step) == ALL_KEYS and len(ref) == 5
    for world, workers in ((2, 0), (3, 2)):
        got, loaders = _global_steps(shards, world, 12, workers=workers)
        assert got == ref, f"world size {world}"
        assert sum(ldr.stats["samples"] for ldr in loaders) == NUM
    # a resume after 2 steps, with another world size at the same global batch, continues exactly
    first, loaders = _global_steps(shards, 2, 12, steps=2)
    state = merge_states([ldr.state_dict() for ldr in loaders])
    for world, workers in ((3, 2), (1, 0)):
        rest, _ = _global_steps(shards, world, 12, state=state, workers=workers)
        assert first + rest == ref, f"resumed with world size {world}, {workers} workers"
    # the default mode deals shards to ranks, so its global batches depend on the world size
    runs = [_take(_loader(shards, r, 2, 0, batch_size=6))[0] for r in range(2)]
    assert [set(runs[0][k]) | set(runs[1][k]) for k in range(2)] != ref[:2]


def test_the_training_config_selects_the_global_order(shards, s3_env):
    """``data.global_order=true`` reaches the trainer's loaders: two ranks' first global batch is
    the one a single rank reads."""
    from ctm_dist.train.config import build_config
    from ctm_dist.tasks import make_task

    def first_global_batch(world: int, global_order: bool) -> set[str]:
        cfg = build_config(
            overrides=[
                "data.task=imagenet",
                f"data.url={shards.url}",
                f"data.global_order={str(global_order).lower()}",
            ]
        )
        keys = set()
        for rank in range(world):
            batch = next(iter(make_task(cfg, rank, world).train_loader(12 // world, seed=3)))
            keys |= {k for k, v in zip(batch["key"], batch["valid"].tolist()) if v}
        return keys

    assert first_global_batch(2, True) == first_global_batch(1, True)
    assert first_global_batch(2, False) != first_global_batch(1, False)
