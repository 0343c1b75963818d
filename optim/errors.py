"""Errors raised by the sync-mode and recovery math in `optim/`.

Every error is a `ValueError` subclass (a caller that only knows "bad input" can still catch
it) and its message says what was wrong and what to do about it. The peer turns them into log
lines, metrics and, where a replica is at fault, into a dropped contribution; nothing here is
about the network.
"""

from __future__ import annotations


class OptimError(ValueError):
    """Base class of every error raised by `optim/`."""


class ConfigError(OptimError):
    """A hyperparameter is out of its valid range."""


class ShapeMismatch(OptimError):
    """Tensors that must line up (parameters, gradients, deltas, stage states) do not."""


class NonFiniteValues(OptimError):
    """A tensor that must be finite holds NaN or inf."""


class PacketRejected(OptimError):
    """A DeMo packet from a replica failed validation (shape, index range, finiteness, bound)."""


class NoContributions(OptimError):
    """An aggregation was asked to combine zero valid contributions."""


class PrecisionError(OptimError):
    """A tensor has a dtype that would silently lose the update (e.g. bf16 master weights)."""


class LedgerError(OptimError):
    """An SPSA ledger entry is duplicated, out of order, or outside the ledger's range."""


class StateMismatch(OptimError):
    """An exported optimizer state or a neighbour's stage state does not fit the target."""
