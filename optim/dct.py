"""The chunked orthonormal DCT-II that DeMo compresses momenta with (optim/demo.py).

A tensor is viewed as 2-D and cut into blocks (`Chunking`); each block is transformed by the
orthonormal DCT-II matrix on either side. The basis is built in float64 from `math.cos` and
cast, so every replica of one build holds the very same matrices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from optim.errors import ShapeMismatch


def chunk_size(n: int, target: int) -> int:
    """Largest divisor of n that is <= target (n itself when n <= target; 1 for a large prime)."""
    if n <= target:
        return max(n, 1)
    return next(c for c in range(target, 0, -1) if n % c == 0)


@dataclass(frozen=True)
class Chunking:
    """How one parameter is cut into DCT blocks."""

    rows: int
    cols: int
    c1: int
    c2: int

    @classmethod
    def of(cls, shape: Sequence[int], target: int) -> Chunking:
        dims = [int(d) for d in shape]
        if any(d == 0 for d in dims):
            raise ShapeMismatch(f"DeMo cannot chunk an empty tensor of shape {tuple(dims)}")
        rows = math.prod(dims[:-1]) if len(dims) >= 2 else 1
        cols = dims[-1] if dims else 1
        return cls(rows, cols, chunk_size(rows, target), chunk_size(cols, target))

    @property
    def n_chunks(self) -> int:
        return (self.rows // self.c1) * (self.cols // self.c2)

    @property
    def per_chunk(self) -> int:
        return self.c1 * self.c2

    def k(self, topk: int) -> int:
        return min(topk, self.per_chunk)

    def dct(self, x: Tensor) -> Tensor:
        """[...param shape] -> [n_chunks, c1*c2] orthonormal DCT-II coefficients."""
        b1, b2 = dct_basis(self.c1, x.dtype, x.device), dct_basis(self.c2, x.dtype, x.device)
        blocks = x.reshape(self.rows // self.c1, self.c1, self.cols // self.c2, self.c2)
        blocks = blocks.permute(0, 2, 1, 3).reshape(-1, self.c1, self.c2)
        return (b1 @ blocks @ b2.T).reshape(self.n_chunks, self.per_chunk)

    def idct(self, coeffs: Tensor, shape: Sequence[int]) -> Tensor:
        """Inverse of `dct`: [n_chunks, c1*c2] -> tensor of `shape`."""
        b1 = dct_basis(self.c1, coeffs.dtype, coeffs.device)
        b2 = dct_basis(self.c2, coeffs.dtype, coeffs.device)
        blocks = b1.T @ coeffs.reshape(-1, self.c1, self.c2) @ b2
        blocks = blocks.reshape(self.rows // self.c1, self.cols // self.c2, self.c1, self.c2)
        return blocks.permute(0, 2, 1, 3).reshape(tuple(shape))


@lru_cache(maxsize=128)
def dct_basis(n: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """Orthonormal DCT-II matrix C (C @ x is the transform, C.T its inverse), cached."""
    rows = []
    for k in range(n):
        norm = math.sqrt(1.0 / n) if k == 0 else math.sqrt(2.0 / n)
        rows.append([norm * math.cos(math.pi * (2 * i + 1) * k / (2 * n)) for i in range(n)])
    return torch.tensor(rows, dtype=torch.float64).to(device=device, dtype=dtype)
