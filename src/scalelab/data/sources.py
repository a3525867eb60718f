"""Where staged images come from: synthetic, digits, imagefolder and npz sources.

A source knows every item's label up front (so the split can be planned and
stratified before any pixel is decoded) and loads images by item id in
chunks, so a dataset larger than memory is streamed into shards. Loading may
drop items (imagefolder: unreadable files); the stager records what was kept.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.data import kinds
from scalelab.data.memory import open_npz
from scalelab.data.synthetic import ClassPatterns
from scalelab.errors import BadInputData, UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SOURCE_KINDS = kinds.STAGE_KINDS


class Source:
    """Base class: metadata plus ``iter_load`` over chunks of item ids."""

    kind: str = ""
    classes: list[str]
    image_shape: tuple[int, int, int]
    dtype: np.dtype
    #: multiply stored values by this to get the [0, 1] range (1.0 for float data)
    scale: float
    #: int64 label of every item, indexed by item id
    labels: np.ndarray
    #: relative names of items that could not be loaded, in the order met
    skipped: list[str]
    #: items per load call at most (small where loading is slow, for even work and progress)
    max_chunk_rows: int = 1 << 20

    def describe(self) -> dict[str, Any]:
        """Provenance recorded in the index (no timestamps: staging is reproducible)."""
        return {"kind": self.kind}

    def item_names(self) -> list[str] | None:
        """Names of the items by id, when they have names (imagefolder files)."""
        return None

    def iter_load(self, chunks: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(images, kept_ids)`` for each chunk of ids, in order."""
        for ids in chunks:
            yield self._load(ids), ids

    def _load(self, ids: np.ndarray) -> np.ndarray:
        """Images of ``ids``; sources that decode in worker processes override iter_load."""
        raise TypeError(f"{type(self).__name__} has no _load; it overrides iter_load")


class ArraySource(Source):
    """Images already in memory (digits, npz): loading is a gather."""

    def __init__(
        self,
        kind: str,
        images: np.ndarray,
        labels: np.ndarray,
        classes: list[str],
        scale: float,
        info: dict[str, Any],
    ):
        self.kind = kind
        self._images = images
        self.labels = labels.astype(np.int64, copy=False)
        self.classes = classes
        self.image_shape = tuple(int(s) for s in images.shape[1:])  # type: ignore[assignment]
        self.dtype = images.dtype
        self.scale = scale
        self.skipped = []
        self._info = info

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, **self._info}

    def _load(self, ids: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self._images[ids])


def digits_source() -> ArraySource:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None, :, :]
    return ArraySource(
        kinds.DIGITS,
        images,
        bunch.target,
        [str(c) for c in range(10)],
        scale=1.0 / 16.0,
        info={"origin": "sklearn.datasets.load_digits"},
    )


def npz_source(path: Path, layout: str = "auto") -> ArraySource:
    """Arrays a user already has: keys ``images`` (or ``x``), ``labels`` (or ``y``),
    optional ``classes`` (names). Images are N,H,W or N,H,W,C or N,C,H,W."""

    path = Path(path)
    with open_npz(
        path,
        f"--path {path}: no such file (expected an .npz archive)",
        lambda exc: f"{path}: not a readable .npz archive ({exc})",
        BadInputData,
    ) as archive:
        keys = set(archive.files)
        ikey = next((k for k in ("images", "x") if k in keys), None)
        lkey = next((k for k in ("labels", "y") if k in keys), None)
        if ikey is None or lkey is None:
            raise BadInputData(
                f"{path}: needs arrays 'images' (or 'x') and 'labels' (or 'y'); "
                f"found {sorted(keys)}"
            )
        images = archive[ikey]
        labels = archive[lkey]
        names = archive["classes"] if "classes" in keys else None
    images = _to_nchw(images, layout, f"{path}: array '{ikey}'")
    if images.dtype == np.uint8:
        scale = 1.0 / 255.0
    elif images.dtype.kind == "f":
        images = images.astype(np.float32, copy=False)
        scale = 1.0
    else:
        raise BadInputData(f"{path}: array '{ikey}' has dtype {images.dtype}; use uint8 or float")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
        raise BadInputData(
            f"{path}: array '{lkey}' must be 1-D integers, one per image "
            f"(got shape {labels.shape}, dtype {labels.dtype}, {len(images)} images)"
        )
    if len(labels) == 0:
        raise BadInputData(f"{path}: holds no images")
    if labels.min() < 0:
        raise BadInputData(f"{path}: array '{lkey}' has negative labels")
    num_classes = int(labels.max()) + 1
    if names is not None:
        classes = [str(n) for n in names.tolist()]
        if len(classes) < num_classes:
            raise BadInputData(
                f"{path}: array 'classes' names {len(classes)} classes but labels go up to "
                f"{num_classes - 1}"
            )
    else:
        classes = [str(c) for c in range(num_classes)]
    return ArraySource(kinds.NPZ, images, labels, classes, scale, {"path": str(path.resolve())})


def _to_nchw(images: np.ndarray, layout: str, what: str) -> np.ndarray:
    """Bring images to N,C,H,W, guessing the layout from the channel axis when 'auto'."""
    if images.ndim == 3:
        return images[:, None, :, :]
    if images.ndim != 4:
        raise BadInputData(f"{what} has shape {images.shape}; expected N,H,W or N,H,W,C or N,C,H,W")
    if layout == "auto":
        last, first = images.shape[3] in (1, 3, 4), images.shape[1] in (1, 3, 4)
        if last == first:
            raise BadInputData(
                f"{what} has shape {images.shape}: cannot tell channels-first from "
                "channels-last; pass --layout nchw or nhwc"
            )
        layout = "nhwc" if last else "nchw"
    if layout == "nhwc":
        images = images.transpose(0, 3, 1, 2)
    elif layout != "nchw":
        raise UsageError(f"--layout {layout}: must be auto, nchw or nhwc")
    return np.ascontiguousarray(images)


class SyntheticSource(Source):
    """Learnable, non-trivial random images (:class:`~scalelab.data.synthetic.ClassPatterns`).

    Image ``i`` depends only on (seed, i), and is built from two gathers and an
    add, so generation is much faster than the disk and staging throughput
    measures the writer.
    """

    kind = kinds.STAGE_SYNTHETIC

    def __init__(
        self, num_samples: int, num_classes: int, image_shape: tuple[int, int, int], seed: int
    ):
        if num_samples < 1:
            raise UsageError(f"--num-samples {num_samples}: must be >= 1")
        if num_classes < 2:
            raise UsageError(
                f"--num-classes {num_classes}: must be >= 2 (a classifier "
                "needs at least two classes)"
            )
        rng = np.random.default_rng(seed)
        self._seed = seed
        self.classes = [str(c) for c in range(num_classes)]
        self.image_shape = image_shape
        self.dtype = np.dtype(np.uint8)
        self.scale = 1.0 / 255.0
        self.skipped = []
        self.labels = rng.integers(0, num_classes, num_samples, dtype=np.int64)

        self._patterns = ClassPatterns(num_classes, image_shape, seed)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_samples": len(self.labels)}

    def _load(self, ids: np.ndarray) -> np.ndarray:
        return self._patterns.images(ids, self.labels[ids])


class ImageFolderSource(Source):
    """A directory of class sub-folders of JPEG/PNG files (ImageNet layout).

    Classes are the sorted sub-folder names; files are found recursively and
    sorted, so item ids (and the staged bytes) do not depend on directory order.
    Images are decoded in worker processes, converted to RGB or grayscale, and
    resized to ``image_size`` (center crop to the aspect ratio, or stretch).
    """

    kind = kinds.IMAGEFOLDER
    max_chunk_rows = 32

    def __init__(
        self,
        root: Path,
        image_size: tuple[int, int],
        channels: int = 3,
        resize: str = "crop",
        max_bad: str | int | float = "0.1%",
        workers: int | None = None,
    ):
        root = Path(root)
        if channels not in (1, 3):
            raise UsageError(f"--channels {channels}: must be 1 (grayscale) or 3 (RGB)")
        if resize not in ("crop", "stretch"):
            raise UsageError(f"--resize {resize}: must be crop or stretch")
        if min(image_size) < 1:
            raise UsageError(f"--image-size {image_size[0]} {image_size[1]}: must be positive")
        self.root = root
        self.image_shape = (channels, int(image_size[0]), int(image_size[1]))
        self.dtype = np.dtype(np.uint8)
        self.scale = 1.0 / 255.0
        self.skipped = []
        self._resize = resize
        self._workers = workers if workers is not None else default_workers()
        self.classes, self._files, self.labels = scan_imagefolder(root)
        self.max_bad = parse_max_bad(max_bad, len(self._files))
        self._max_bad_text = str(max_bad)
        self.bad_reasons: list[str] = []

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.root.resolve()),
            "files": len(self._files),
            "resize": self._resize,
            "max_bad": self._max_bad_text,
        }

    def item_names(self) -> list[str]:
        return self._files

    def iter_load(self, chunks: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        mode = "L" if self.image_shape[0] == 1 else "RGB"
        size = self.image_shape[1:]
        root = str(self.root)

        def job(ids: np.ndarray) -> tuple[Callable[..., Any], tuple[Any, ...]]:
            paths = [os.path.join(root, self._files[i]) for i in ids]
            return decode_many, (paths, size, mode, self._resize)

        for ids, results in _ordered_map(job, chunks, self._workers):
            keep = np.array([not isinstance(r, str) for r in results], dtype=bool)
            for i, r in zip(ids, results, strict=True):
                if isinstance(r, str):
                    self._bad(self._files[i], r)
            kept = [r for r in results if not isinstance(r, str)]
            images = np.stack(kept) if kept else np.empty((0, *self.image_shape), dtype=np.uint8)
            yield images, ids[keep]

    def _bad(self, name: str, reason: str) -> None:
        self.skipped.append(name)
        self.bad_reasons.append(reason)
        if len(self.skipped) > self.max_bad:
            raise BadInputData(
                f"{self.root / name}: cannot decode image ({reason}); "
                f"{len(self.skipped)} unreadable image(s), over the limit --max-bad "
                f"{self._max_bad_text} (= {self.max_bad} of {len(self._files)})"
            )


def default_workers() -> int:
    """Decoder processes: the CPUs this process may use (Slurm's cpuset), at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 16))


def parse_max_bad(value: str | int | float, total: int) -> int:
    """``--max-bad``: a count ("5") or a percentage of all files ("0.1%")."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return int(math.floor(total * pct / 100.0))
        count = int(text)
        if count < 0:
            raise ValueError
        return count
    except ValueError:
        raise UsageError(
            f"--max-bad {value}: expected a count >= 0 or a percentage like 0.1%"
        ) from None


def scan_imagefolder(root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Classes, relative file paths and labels of an image folder; errors name the folder."""
    if not root.exists():
        raise BadInputData(f"--path {root}: no such directory")
    if not root.is_dir():
        raise BadInputData(f"--path {root}: not a directory (imagefolder expects ROOT/CLASS/IMAGE)")
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise BadInputData(f"--path {root}: directory is empty (expected ROOT/CLASS/IMAGE files)")
    class_dirs = sorted((p for p in entries if p.is_dir()), key=lambda p: p.name)
    if not class_dirs:
        raise BadInputData(
            f"--path {root}: no class sub-folders (expected ROOT/CLASS/IMAGE; found only files)"
        )
    files: list[str] = []
    labels: list[int] = []
    for label, cdir in enumerate(class_dirs):
        found = sorted(
            str(p.relative_to(root))
            for p in cdir.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and p.is_file()
        )
        if not found:
            raise BadInputData(f"{cdir}: class folder has no images ({'/'.join(IMAGE_SUFFIXES)})")
        files.extend(found)
        labels.extend([label] * len(found))
    return [p.name for p in class_dirs], files, np.asarray(labels, dtype=np.int64)


def decode_many(
    paths: list[str], size: tuple[int, int], mode: str, resize: str
) -> list[np.ndarray | str]:
    """Decode a chunk of files in a worker: a C,H,W uint8 array, or the error text."""
    return [decode_image(p, size, mode, resize) for p in paths]


def decode_image(path: str, size: tuple[int, int], mode: str, resize: str) -> np.ndarray | str:
    """One image as C,H,W uint8, or why it could not be read (never raises)."""
    from PIL import Image, ImageOps

    height, width = size
    try:
        with Image.open(path) as img:
            w, h = img.size
            if resize == "crop":
                s = max(width / w, height / h)
                # JPEG: let libjpeg decode at a reduced scale that still covers the target
                img.draft(mode, (math.ceil(w * s), math.ceil(h * s)))
            else:
                img.draft(mode, (width, height))
            img = img.convert(mode)
            if img.size != (width, height):
                if resize == "crop":
                    img = ImageOps.fit(img, (width, height), Image.Resampling.BILINEAR)
                else:
                    img = img.resize((width, height), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # Pillow raises many types for bad files; all mean "unreadable"
        return f"{type(exc).__name__}: {exc}"
    return arr[None, :, :] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _ordered_map(
    job: Callable[[np.ndarray], tuple[Callable[..., Any], tuple[Any, ...]]],
    chunks: Iterable[np.ndarray],
    workers: int,
) -> Iterator[tuple[np.ndarray, Any]]:
    """Run ``fn(*args)`` for each chunk in worker processes; yield results in input order.

    At most ``2 * workers`` chunks are in flight, so memory stays bounded
    however large the folder is. One worker runs in-process (no pool).
    """
    if workers <= 1:
        for ids in chunks:
            fn, args = job(ids)
            yield ids, fn(*args)
        return
    import multiprocessing

    # spawn: the stager runs a writer thread, and fork() with threads is unsafe
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    pending: deque[tuple[np.ndarray, Future[Any]]] = deque()
    try:
        for ids in chunks:
            fn, args = job(ids)
            pending.append((ids, pool.submit(fn, *args)))
            if len(pending) >= 2 * workers:
                done_ids, fut = pending.popleft()
                yield done_ids, fut.result()
        while pending:
            done_ids, fut = pending.popleft()
            yield done_ids, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
