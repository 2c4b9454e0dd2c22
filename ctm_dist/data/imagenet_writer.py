"""ImageNet (ILSVRC2012) shard sets from the standard folder layout.

``{root}/train/<wnid>/*.JPEG``; validation either as class folders ``{root}/val/<wnid>/*.JPEG`` or flat
``{root}/val/*.JPEG`` labelled by one of: the devkit (``data/ILSVRC2012_validation_ground_truth.txt`` with
``data/meta.mat``), that ground-truth file with a synset list (line k = wnid of ILSVRC2012_ID k), or a
mapping file of ``name wnid`` lines (spaces or a comma; Kaggle's ``LOC_val_solution.csv`` works).
Class index = position in the sorted wnid list (as torchvision's ``ImageFolder``), taken from
``{root}/train`` when it exists. Samples: ``.jpg``, ``.cls``, ``.json`` (``wnid``, ``source``).
"""

from __future__ import annotations

import io
import os
import re
import sys
from functools import partial

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .index import ShardIndex
from .writer import ShardSetWriter, encode_image, encode_json, parallel_map

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def class_folders(directory: str) -> list[str]:
    return sorted(
        e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")
    )


def scan_class_folders(directory: str) -> list[tuple[str, str]]:
    """(relative path, wnid) of every image in ``directory/<wnid>/``."""
    items = []
    for wnid in class_folders(directory):
        for name in sorted(os.listdir(os.path.join(directory, wnid))):
            if _is_image(name):
                items.append((f"{wnid}/{name}", wnid))
    return items


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def read_mapping_file(path: str) -> dict[str, str]:
    """``name wnid`` (or ``name,wnid ...``) lines -> {file stem: wnid}; a header line is ignored."""
    mapping = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            tokens = [t for t in re.split(r"[,\s]+", line.strip()) if t]
            if not tokens:
                continue
            if len(tokens) < 2 or not re.fullmatch(r"n\d{8}", tokens[1]):
                if number == 1:
                    continue  # header such as "ImageId,PredictionString"
                raise ValueError(f"{path}:{number}: expected 'name wnid', got {line.strip()!r}")
            mapping[_stem(tokens[0])] = tokens[1]
    return mapping


def synsets_from_meta_mat(path: str) -> list[str]:
    """wnids of ILSVRC2012_ID 1..N from the devkit's ``meta.mat`` (leaf classes only)."""
    from scipy.io import loadmat

    synsets = loadmat(path, squeeze_me=True)["synsets"]
    by_id = {
        int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0
    }
    return [by_id[i] for i in range(1, len(by_id) + 1)]


def synsets_from_list(path: str) -> list[str]:
    """First token of each non-empty line: line k holds the wnid of ILSVRC2012_ID k."""
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


def devkit_mapping(files: list[str], ground_truth: str, synsets: list[str]) -> dict[str, str]:
    """Label the sorted flat validation files with the ground-truth IDs (one per line, in file order)."""
    with open(ground_truth, encoding="utf-8") as f:
        ids = [int(line) for line in f if line.strip()]
    if len(ids) != len(files):
        raise ValueError(
            f"{ground_truth} has {len(ids)} labels but there are {len(files)} validation images"
        )
    return {_stem(name): synsets[i - 1] for name, i in zip(files, ids)}


def scan_split(
    root: str,
    split: str,
    *,
    mapping: str | None = None,
    devkit: str | None = None,
    synsets: str | None = None,
) -> list[tuple[str, str]]:
    """(path relative to ``root/split``, wnid) for every image of the split, sorted by path."""
    directory = os.path.join(root, split)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no folder {directory}")
    if class_folders(directory) and not any(_is_image(n) for n in os.listdir(directory)):
        return scan_class_folders(directory)
    files = sorted(n for n in os.listdir(directory) if _is_image(n))
    if mapping:
        labels = read_mapping_file(mapping)
    elif devkit or synsets:
        data = os.path.join(devkit, "data") if devkit else None
        truth = os.path.join(data, GROUND_TRUTH) if data else None
        if truth is None or not os.path.exists(truth):
            raise ValueError(f"flat {split} images need {GROUND_TRUTH} under --devkit DIR/data")
        order = (
            synsets_from_list(synsets)
            if synsets
            else synsets_from_meta_mat(os.path.join(data, "meta.mat"))
        )
        labels = devkit_mapping(files, truth, order)
    else:
        raise ValueError(
            f"{directory} holds flat images: give --devkit (with --synsets or the devkit's "
            f"meta.mat) or --val-map to label them"
        )
    missing = [n for n in files if _stem(n) not in labels]
    if missing:
        raise ValueError(f"{len(missing)} images have no label, e.g. {missing[0]}")
    return [(name, labels[_stem(name)]) for name in files]


def _encode(
    item: tuple[str, str, int], *, directory: str, resize_shorter: int | None, quality: int
):
    relpath, wnid, label = item
    path = os.path.join(directory, relpath)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        with Image.open(io.BytesIO(raw)) as im:
            is_plain_jpeg = im.format == "JPEG" and im.mode == "RGB"
            im.load()
            if resize_shorter:
                scale = resize_shorter / min(im.size)
                size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                jpg = encode_image(
                    im.convert("RGB").resize(size, Image.Resampling.BICUBIC), "jpg", quality
                )
            elif is_plain_jpeg:
                jpg = raw  # unchanged: no second lossy pass
            else:
                jpg = encode_image(
                    im.convert("RGB"), "jpg", quality
                )  # CMYK / greyscale / PNG sources
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"{relpath}: {e}"
    key = _stem(relpath).replace(".", "_")
    return {
        "__key__": key,
        "jpg": jpg,
        "cls": str(label).encode("ascii"),
        "json": encode_json({"wnid": wnid, "source": relpath}),
    }


def write_imagenet_shards(
    location,
    root: str,
    split: str,
    *,
    out_split: str | None = None,
    resize_shorter: int | None = None,
    quality: int = 95,
    seed: int = 0,
    shuffle: bool = True,
    samples_per_shard: int = 1000,
    workers: int = 1,
    mapping: str | None = None,
    devkit: str | None = None,
    synsets: str | None = None,
    progress: bool = True,
) -> tuple[ShardIndex, list[str]]:
    """Write ``root/split`` as the shard set ``out_split`` (default ``split``); returns (index, skipped).

    Undecodable images are skipped with a warning and counted in ``meta.skipped``.
    """
    out_split = out_split or split
    items = scan_split(root, split, mapping=mapping, devkit=devkit, synsets=synsets)
    if not items:
        raise FileNotFoundError(f"no images under {os.path.join(root, split)}")
    train_dir = os.path.join(root, "train")
    classes = (
        class_folders(train_dir) if os.path.isdir(train_dir) else sorted({w for _, w in items})
    )
    class_index = {w: i for i, w in enumerate(classes)}
    unknown = sorted({w for _, w in items if w not in class_index})
    if unknown:
        raise ValueError(
            f"{len(unknown)} wnids of {split} are not classes of {train_dir}: {unknown[:5]}"
        )
    if shuffle:
        items = [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
    work = [(p, w, class_index[w]) for p, w in items]
    encode = partial(
        _encode, directory=os.path.join(root, split), resize_shorter=resize_shorter, quality=quality
    )
    results = parallel_map(encode, work, workers, chunksize=32)
    meta = {
        "num_classes": len(classes),
        "classes": classes,
        "image_size": resize_shorter,
        "source": "ILSVRC2012 folders",
        "seed": seed,
        "shuffled": shuffle,
    }
    skipped: list[str] = []
    with ShardSetWriter(location, out_split, "imagenet", samples_per_shard, meta) as writer:
        for result in tqdm(
            results,
            total=len(work),
            desc=f"imagenet/{out_split}",
            unit="image",
            disable=not progress,
            dynamic_ncols=True,
        ):
            if isinstance(result, str):
                skipped.append(result)
                print(f"warning: skipped unreadable image {result}", file=sys.stderr)
                continue
            writer.write(result)
        writer.index.meta["skipped"] = len(skipped)
    return writer.index, skipped
