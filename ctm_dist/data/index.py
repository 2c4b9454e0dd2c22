"""The shard-set index: ``{out}/{split}.json`` lists every tar of a split with its sample count.

The index is written after all of its shards, so a shard set without an index is incomplete.
Counts are checked on both sides (``ShardIndex.check``): every shard is named once and holds a
whole number of samples >= 0, and ``num_samples`` is their sum. The reader further checks each count
against the size of its tar and against what the tar really holds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ctm_dist.storage import Location

FORMAT = "ctm-dist-shards/1"


def shard_name(split: str, number: int) -> str:
    """File name of shard ``number`` of ``split``: ``train-000000.tar``."""
    return f"{split}-{number:06d}.tar"


def index_name(split: str) -> str:
    return f"{split}.json"


@dataclass
class ShardInfo:
    name: str
    samples: int


@dataclass
class ShardIndex:
    task: str
    split: str
    shards: list[ShardInfo] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def check(self) -> ShardIndex:
        """Raise ``ValueError`` naming the shard if a count is not a whole number >= 0 or a name repeats."""
        seen: set[str] = set()
        for s in self.shards:
            if not isinstance(s.name, str) or not s.name:
                raise ValueError(f"shard index {self.split!r}: a shard has no name: {s.name!r}")
            if s.name in seen:
                raise ValueError(f"shard index {self.split!r} lists {s.name!r} twice")
            seen.add(s.name)
            if isinstance(s.samples, bool) or not isinstance(s.samples, int) or s.samples < 0:
                raise ValueError(
                    f"shard index {self.split!r}: {s.name!r} has samples={s.samples!r}, "
                    "expected a whole number >= 0"
                )
        return self

    def to_json(self) -> str:
        self.check()
        doc = {
            "format": self.format,
            "task": self.task,
            "split": self.split,
            "num_samples": self.num_samples,
            "shards": [asdict(s) for s in self.shards],
            "meta": self.meta,
        }
        return json.dumps(doc, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ShardIndex:
        doc = json.loads(text)
        if doc.get("format") != FORMAT:
            raise ValueError(
                f"not a shard index of format {FORMAT!r}: format={doc.get('format')!r}"
            )
        shards = [ShardInfo(name=s["name"], samples=s["samples"]) for s in doc["shards"]]
        index = cls(
            task=doc["task"], split=doc["split"], shards=shards, meta=dict(doc.get("meta", {}))
        ).check()
        if doc["num_samples"] != index.num_samples:
            raise ValueError(
                f"shard index {doc['split']!r} is inconsistent: num_samples={doc['num_samples']} "
                f"but its shards hold {index.num_samples}"
            )
        return index


def read_index(location, split: str) -> ShardIndex:
    """Read ``{location}/{split}.json``; ``location`` is a ``ctm_dist.storage.Location`` or a URL."""
    if isinstance(location, str):
        location = Location.parse(location)
    try:
        with location.open(index_name(split), "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no shard index {index_name(split)!r} at {location}: the shard set is missing or incomplete"
        ) from None
    return ShardIndex.from_json(text)
