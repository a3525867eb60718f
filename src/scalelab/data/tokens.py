"""Seeded synthetic token sequences that a language model can learn.

Sequences come from a fixed random Markov chain: every token has ``branching``
possible successors, taken with probabilities ``PROBS``. A model that learns the
chain reaches the chain's entropy rate (:attr:`TokenSequences.entropy_nats`); a
model that learns nothing stays at ``log(vocab)``. So the loss has a known floor
and a known start, and "learned" can be checked. Sequence ``i`` is a function of
``(seed, i)`` only (hashed, vectorized over the batch), like the synthetic images,
so nothing is stored and any rank can read any sample.
"""

from __future__ import annotations

import math

import numpy as np

from scalelab.data.synthetic import _mix

#: Successor probabilities, most likely first (entropy 1.16 nats per token).
PROBS = np.array([0.6, 0.2, 0.1, 0.05, 0.05])


class TokenSequences:
    """``num_samples`` sequences of ``seq_len`` inputs and ``seq_len`` next-token targets.

    Fits the trainer's dataset interface: ``num_classes`` is the vocabulary,
    ``image_shape`` is ``(seq_len,)``; ``get_batch`` returns int64 inputs (N, T) and
    targets (N, T), targets being the inputs shifted by one token.
    ``first_index`` shifts the sample ids (validation = same chain, unseen ids).
    """

    def __init__(
        self, num_samples: int, vocab_size: int, seq_len: int, seed: int = 0, first_index: int = 0
    ) -> None:
        if num_samples < 1 or seq_len < 1 or vocab_size < len(PROBS):
            raise ValueError(f"need num_samples >= 1, seq_len >= 1, vocab_size >= {len(PROBS)}")
        self.num_samples, self.seq_len = int(num_samples), int(seq_len)
        self.num_classes = int(vocab_size)
        self.image_shape = (self.seq_len,)
        self.seed, self.first_index = int(seed), int(first_index)
        rng = np.random.default_rng([self.seed, 0x70C5])
        # distinct successors per token: the first len(PROBS) of a random permutation
        self._succ = np.argsort(rng.random((vocab_size, vocab_size)), axis=1)[:, : len(PROBS)]
        self._cdf = np.cumsum(PROBS)

    @property
    def entropy_nats(self) -> float:
        """Entropy rate of the chain: the lowest mean loss a model can reach."""
        return float(-(PROBS * np.log(PROBS)).sum())

    @property
    def uniform_nats(self) -> float:
        """Loss of a model that predicts every token equally likely."""
        return math.log(self.num_classes)

    def __len__(self) -> int:
        return self.num_samples

    def sequences(self, indices: np.ndarray) -> np.ndarray:
        """int64 (N, T + 1) token sequences of sample ``indices``."""
        ids = np.asarray(indices, dtype=np.int64) + self.first_index
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        out[:, 0] = (_mix(ids, self.seed) % np.uint64(self.num_classes)).astype(np.int64)
        base = ids.astype(np.uint64) * np.uint64(self.seq_len + 1)
        for t in range(1, self.seq_len + 1):
            h = _mix(base + np.uint64(t), self.seed + 1)
            u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
            choice = np.minimum(np.searchsorted(self._cdf, u, side="right"), len(PROBS) - 1)
            out[:, t] = self._succ[out[:, t - 1], choice]
        return out

    def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each int64 (N, T)."""
        indices = np.asarray(indices)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(f"index out of range [0, {self.num_samples})")
        seq = self.sequences(indices)
        return seq[:, :-1], seq[:, 1:]


def token_splits(
    num_samples: int, val_samples: int | None, vocab_size: int, seq_len: int, seed: int
) -> tuple[TokenSequences, TokenSequences | None]:
    """Training split and (optionally) a validation split of the same chain."""
    train = TokenSequences(num_samples, vocab_size, seq_len, seed)
    val = (
        TokenSequences(val_samples, vocab_size, seq_len, seed, first_index=num_samples)
        if val_samples
        else None
    )
    return train, val
