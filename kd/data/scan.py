"""The start-up scan: every file of a split read in full before training, so a bad file fails now, not mid-epoch,
and a training image with the bytes of a val or test image (a copy or a link) is refused."""

import hashlib
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kd.config import DataConfig
from kd.data.dataset import UNLABELED, LeafDataset, decoded_size
from kd.data.layouts import Source, shown, split_images
from kd.data.multispectral import FILE_ERRORS, load_ms, ms_stack, require_regular
from kd.errors import UserError

THREADS = min(16, os.cpu_count() or 1)  # decoding threads: Pillow and numpy release the GIL while decoding


def check_sample(dataset: LeafDataset, index: int) -> tuple[tuple[Path, str] | None, int | None, bytes | None]:
    """((bad file, why) or None, MS band count or None, the image's content hash or None) of one sample, read in
    full: a truncated file or a NaN is found here, not mid-epoch."""
    path = dataset.samples[index][0]
    try:
        digest = file_digest(path)  # before decoding: the bytes are then in the page cache
        hw = decoded_size(path)
    except FILE_ERRORS as e:
        return (path, f"unreadable image ({e})"), None, None
    ms_path = dataset.ms_files.get(path)
    if ms_path is None:
        return None, None, digest
    try:
        array, pages = load_ms(ms_path)
        stack = ms_stack(array, pages, hw, dataset.ms_layout, dataset.ms_bands, ms_path)
    except FILE_ERRORS as e:
        return (ms_path, f"unreadable multispectral file ({e})"), None, None
    except UserError as e:
        return (ms_path, str(e)), None, None
    bad = int((~np.isfinite(stack)).sum())
    if bad:  # one NaN makes the band statistics NaN, and with them every training step
        return (ms_path, f"NaN or infinite values ({bad} of {stack.size}); fix or delete the file"), None, None
    return None, len(stack), digest


def scan_dataset(dataset: LeafDataset, on_bad_file: str = "error", workers: int = 0) -> list[tuple[Path, str]]:
    """Check every sample (check_sample), and that MS files agree on their band count (else batches cannot stack);
    raise, or with on_bad_file="skip" drop and warn. Returns [(bad file, why)]; fills `dataset.digests`."""
    with ThreadPoolExecutor(workers or THREADS) as pool:
        results = list(pool.map(lambda i: check_sample(dataset, i), range(len(dataset))))
    dataset.digests = {dataset.samples[i][0]: d for i, (_, _, d) in enumerate(results) if d is not None}
    found = {i: bad for i, (bad, _, _) in enumerate(results) if bad is not None}
    bands = {i: n for i, (bad, n, _) in enumerate(results) if bad is None and n is not None}
    if bands:
        usual, count = Counter(bands.values()).most_common(1)[0]
        dataset.zero_bands = usual  # zero-filled stacks (data.ms_missing=zeros) must stack with the others
        for i, n in bands.items():
            if n != usual:
                why = f"{n} bands, but {count} of {len(bands)} multispectral files have {usual}"
                found[i] = (dataset.ms_files[dataset.samples[i][0]], why)
    if not found:
        return []
    bad = [found[i] for i in sorted(found)]
    listing = "\n".join(f"  {shown(path)}: {shown(why)}" for path, why in bad[:20])
    listing += "\n  ..." if len(bad) > 20 else ""
    if on_bad_file == "error":
        raise UserError(
            f"{len(bad)} of {len(dataset)} samples have bad files:\n{listing}\n"
            "Fix or delete them, or set data.on_bad_file=skip to leave them out."
        )
    dataset.samples = [s for i, s in enumerate(dataset.samples) if i not in found]
    if not len(dataset):
        raise UserError(f"every sample has a bad file:\n{listing}")
    warnings.warn(f"skipped {len(bad)} samples with bad files (data.on_bad_file=skip):\n{listing}", stacklevel=2)
    return bad


def refuse_leaks(dataset: LeafDataset, cfg: DataConfig) -> None:
    """Refuse a training or unlabelled image with a val or test image's bytes (a copy or a link): trained on, it
    makes the val/test scores measure memory."""
    seen = {path for path, _ in dataset.samples}  # the training split itself: not a leak
    held_out = {p: split for p, split in split_images(Source.of(cfg), ("val", "test")).items() if p not in seen}
    with ThreadPoolExecutor(THREADS) as pool:
        digests = list(pool.map(_digest_or_none, held_out))
    split_of = {d: (path, split) for (path, split), d in zip(held_out.items(), digests) if d is not None}
    leaks = [(path, label) for path, label in dataset.samples if dataset.digests.get(path) in split_of]
    if not leaks:
        return
    kinds = Counter("unlabelled" if label == UNLABELED else "training" for _, label in leaks)
    what = " and ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    copy_of, split = split_of[dataset.digests[leaks[0][0]]]
    raise UserError(
        f"{what} images have the content of val/test images, e.g. {shown(leaks[0][0])} has the same bytes as "
        f"{split} image {shown(copy_of)} (a copy or a link): trained on, they would make the val/test scores measure "
        "memory. Remove each from one of the two sets."
    )


def _digest_or_none(path: Path) -> bytes | None:
    try:
        return file_digest(path)
    except OSError:  # its own split's scan names it
        return None


def file_digest(path: Path) -> bytes:
    """blake2b of the file's bytes (faster than a PNG decodes)."""
    require_regular(path)  # reading a FIFO would wait for a writer
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").digest()
