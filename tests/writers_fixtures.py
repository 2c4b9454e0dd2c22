"""Helpers for the shard-writer tests: read a written shard set back with tarfile, load a script."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import tarfile
from collections import OrderedDict

from PIL import Image

from ctm_dist.data.index import read_index

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_shard_set(location, split):
    """(index, samples): samples as {key: {ext: bytes}} in stored order; checks index <-> tars."""
    index = read_index(location, split)
    samples = OrderedDict()
    for shard in index.shards:
        data = location.read_bytes(shard.name)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            keys = []
            for member in tar.getmembers():
                assert member.isfile() and member.mtime == 0 and member.uid == 0 and member.gid == 0
                key, ext = member.name.split(".", 1)
                if not keys or keys[-1] != key:
                    assert key not in samples, f"key {key} split or repeated"
                    keys.append(key)
                    samples[key] = {}
                samples[key][ext] = tar.extractfile(member).read()
        assert len(keys) == shard.samples, (
            f"{shard.name}: {len(keys)} samples, index says {shard.samples}"
        )
    assert len(samples) == index.num_samples
    return index, samples


def shard_bytes(location, split):
    """{file name: bytes} of the index and every shard of a split."""
    index = read_index(location, split)
    names = [f"{split}.json"] + [s.name for s in index.shards]
    return {name: location.read_bytes(name) for name in names}


def decode(image_bytes):
    im = Image.open(io.BytesIO(image_bytes))
    im.load()
    return im


def doc(sample):
    return json.loads(sample["json"])


def load_script(name):
    """Import datasets/<name>.py (a script folder, not a package) as a module."""
    path = os.path.join(REPO, "datasets", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"ctm_dataset_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
