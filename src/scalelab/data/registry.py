"""The run sources the trainer opens: one :class:`DataSource` per name, behind one protocol.

:func:`data_source` maps the run config's ``data.source`` (a word of
:data:`scalelab.data.kinds.RUN_SOURCES`) to its source, which knows everything that used to
be an ``if source == ...`` elsewhere:

* :meth:`~DataSource.open`: the training and validation splits (validation None when the
  config has none), checked to agree;
* :meth:`~DataSource.test_split`: the held-out test split of a generated source (data on
  disk has its own, which ``evaluate --data`` reads; None);
* :meth:`~DataSource.identity`: what identifies the data, for provenance's ``dataset_hash``
  (a file's sha256, or the sha256 of the fields a generated source is made from);
* :attr:`~DataSource.generated`: made from the config alone (no path), or read from disk;
* :meth:`~DataSource.spec`: the :class:`~scalelab.data.spec.DataSpec` (outputs and input
  shape) of the training split, so every model is built for the data it trains on.

Methods take the whole run config (``cfg.data`` and ``cfg.seed``); it arrives validated.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from scalelab.data import kinds
from scalelab.data.spec import DataSpec
from scalelab.errors import DataError, UsageError
from scalelab.fsio import canonical, sha256_bytes, sha256_file


@runtime_checkable
class DataSource(Protocol):
    """What the trainer, evaluate, predict and provenance need of a run source."""

    #: The run config's ``data.source`` word (from :mod:`scalelab.data.kinds`).
    name: str
    #: Made from the config alone on every rank (no ``data.path``, a generated test split).
    generated: bool

    def open(self, cfg: Any) -> tuple[Any, Any | None]:
        """The training split and the validation split (None when not configured)."""
        ...

    def test_split(self, cfg: Any) -> Any | None:
        """The generated test split, unseen by training and validation (None: on disk)."""
        ...

    def identity(self, cfg: Any) -> dict[str, Any]:
        """``{"source", "path", "sha256", ...}`` identifying the data (provenance)."""
        ...

    def spec(self, cfg: Any) -> DataSpec:
        """The training split's outputs and input shape."""
        ...


# ----------------------------------------------------------------------- generated


class SyntheticImages:
    """Seeded images computed on the fly (:class:`~scalelab.data.synthetic.SyntheticDataset`)."""

    name = kinds.RUN_SYNTHETIC
    generated = True

    def _split(self, cfg: Any, samples: int, first: int):
        from scalelab.data.synthetic import SyntheticDataset

        d = cfg.data
        return SyntheticDataset(
            samples, d.num_classes, tuple(d.image_shape), cfg.seed, d.signal, first_index=first
        )

    def open(self, cfg: Any) -> tuple[Any, Any | None]:
        d = cfg.data
        train = self._split(cfg, d.num_samples, 0)
        val = self._split(cfg, d.val_samples, d.num_samples) if d.val_split else None
        return train, val

    def test_split(self, cfg: Any) -> Any:
        """As many samples as validation, with ids after training and validation."""
        d = cfg.data
        return self._split(cfg, d.val_samples, d.num_samples + d.val_samples)

    def identity(self, cfg: Any) -> dict[str, Any]:
        d = cfg.data
        gen = {
            "num_samples": d.num_samples,
            "val_samples": d.val_samples,
            "num_classes": d.num_classes,
            "image_shape": list(d.image_shape),
            "signal": d.signal,
            "seed": cfg.seed,
        }
        return {"source": self.name, "path": None, "sha256": sha256_bytes(canonical(gen))}

    def spec(self, cfg: Any) -> DataSpec:
        d = cfg.data
        return DataSpec(int(d.num_classes), tuple(int(s) for s in d.image_shape))


class TokenData:
    """Seeded learnable token sequences (:class:`~scalelab.data.tokens.TokenSequences`):
    the outputs are the vocabulary, the input shape ``(seq_len,)``."""

    name = kinds.TOKENS
    generated = True

    def open(self, cfg: Any) -> tuple[Any, Any | None]:
        from scalelab.data.tokens import token_splits

        d = cfg.data
        return token_splits(
            d.num_samples, d.val_samples if d.val_split else None, d.vocab_size, d.seq_len, cfg.seed
        )

    def test_split(self, cfg: Any) -> Any:
        """As many sequences as validation, with ids after training and validation."""
        from scalelab.data.tokens import TokenSequences

        d = cfg.data
        return TokenSequences(
            d.val_samples,
            d.vocab_size,
            d.seq_len,
            cfg.seed,
            first_index=d.num_samples + d.val_samples,
        )

    def identity(self, cfg: Any) -> dict[str, Any]:
        """Token sequences are a function of (seed, vocabulary, sequence length) and the
        split sizes (validation and test ids follow the training ones)."""
        d = cfg.data
        gen = {
            "num_samples": d.num_samples,
            "val_samples": d.val_samples,
            "vocab_size": d.vocab_size,
            "seq_len": d.seq_len,
            "seed": cfg.seed,
        }
        return {"source": self.name, "path": None, "sha256": sha256_bytes(canonical(gen))}

    def spec(self, cfg: Any) -> DataSpec:
        d = cfg.data
        return DataSpec(int(d.vocab_size), (int(d.seq_len),))


# ----------------------------------------------------------------------- on disk


class _FileSource(ABC):
    """Data at ``data.path``: open both splits with :meth:`_opener` and check they agree."""

    name = ""
    generated = False

    @abstractmethod
    def _opener(self):
        """``(path, split) -> dataset``."""

    def _read_path(self, cfg: Any) -> str:
        """Where to read ``data.path`` from on this rank."""
        return cfg.data.path

    def open(self, cfg: Any) -> tuple[Any, Any | None]:
        d = cfg.data
        if not Path(d.path).exists():
            raise UsageError(f"field 'data.path': no such file or directory: {d.path}")
        path = self._read_path(cfg)
        opener = self._opener()
        splits = []
        for field_name, split in (
            ("data.train_split", d.train_split),
            ("data.val_split", d.val_split),
        ):
            if split is None:
                splits.append(None)
                continue
            try:
                splits.append(opener(path, split))
            except DataError as exc:  # corrupt data stays a failed check (1), bad input 2
                raise type(exc)(f"field '{field_name}': {split!r} in {path}: {exc}") from None
            except (OSError, KeyError, ValueError) as exc:
                raise UsageError(f"field '{field_name}': {split!r} in {path}: {exc}") from None
        train, val = splits
        _check_splits(cfg, train, val)
        return train, val

    def test_split(self, cfg: Any) -> None:
        """Data on disk has its own test split (``evaluate --data`` reads it)."""
        return None

    def spec(self, cfg: Any) -> DataSpec:
        """The training split's, read from ``data.path`` (the data carries its classes and
        shape; the config's num_classes and image_shape do not apply)."""
        return DataSpec.of(self._opener()(cfg.data.path, cfg.data.train_split))


def _check_splits(cfg: Any, train: Any, val: Any) -> None:
    d = cfg.data
    if len(train) == 0:
        raise UsageError(f"field 'data.train_split': {d.train_split!r} in {d.path} is empty")
    if val is not None and len(val) == 0:
        raise UsageError(
            f"field 'data.val_split': {d.val_split!r} in {d.path} is empty; "
            "stage with a validation fraction > 0, or set data.val_split: null"
        )
    if val is not None and (
        val.image_shape != train.image_shape or val.num_classes != train.num_classes
    ):
        raise UsageError(
            f"field 'data.val_split': {d.val_split!r} has shape {val.image_shape} "
            f"and {val.num_classes} classes, unlike the training split"
        )


class MemoryNpz(_FileSource):
    """One .npz loaded into memory (:func:`~scalelab.data.memory.load_npz`)."""

    name = kinds.MEMORY_NPZ

    def _opener(self):
        from scalelab.data.memory import load_npz

        return load_npz

    def identity(self, cfg: Any) -> dict[str, Any]:
        path = Path(cfg.data.path)
        return {
            "source": self.name,
            "path": str(path.resolve()),
            "sha256": sha256_file(path) if path.is_file() else None,
        }


class StagedShards(_FileSource):
    """Sharded data written by ``scalelab data stage`` (:mod:`scalelab.data.shards`),
    optionally copied to node-local scratch first (``data.localize``)."""

    name = kinds.STAGED

    def _opener(self):
        try:
            from scalelab.data.shards import open_split
        except ImportError as exc:
            raise UsageError(
                f"field 'data.source': {self.name!r} needs scalelab.data.shards, "
                f"which does not import here ({exc})"
            ) from None
        return open_split

    def _read_path(self, cfg: Any) -> str:
        d = cfg.data
        if not d.localize:
            return d.path
        # Every rank asks; the first on each node copies, the others wait for it.
        from scalelab.data.nodelocal import localize

        try:
            return str(localize(d.path, d.scratch, progress=False))
        except DataError as exc:  # a corrupt dataset is a failed check (exit 1)
            raise type(exc)(f"field 'data.localize': {exc}") from None
        except OSError as exc:
            raise UsageError(f"field 'data.localize': {exc}") from None

    def identity(self, cfg: Any) -> dict[str, Any]:
        from scalelab.data.manifest import MANIFEST_NAME

        manifest = Path(cfg.data.path) / MANIFEST_NAME
        return {
            "source": self.name,
            "path": str(Path(cfg.data.path).resolve()),
            "file": MANIFEST_NAME,
            "sha256": sha256_file(manifest) if manifest.is_file() else None,
        }


# ----------------------------------------------------------------------- registry

#: data.source -> its source; the keys are :data:`scalelab.data.kinds.RUN_SOURCES`.
REGISTRY: dict[str, DataSource] = {
    s.name: s for s in (SyntheticImages(), MemoryNpz(), StagedShards(), TokenData())
}


def data_source(name: str) -> DataSource:
    """The source of run-config ``data.source`` ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"field 'data.source': unknown source {name!r}; valid: {', '.join(kinds.RUN_SOURCES)}"
        ) from None
