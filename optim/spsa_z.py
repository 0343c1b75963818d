"""The SPSA perturbation directions z: Rademacher or Gaussian, from an integer counter hash.

Both streams depend only on (seed, tensor id, flat element index), so every device draws the same
values and a pipeline stage (or one block of a big tensor) generates just its slice via `start`.
Neither uses torch's RNG (torch.randn differs across CPU/CUDA, GPU models and layouts:
ALGORITHMS.md §4).

- `rademacher`: +-1 as int8. Element i is bit (i mod 32) of word(i // 32); one hash per 32
  elements.
- `gaussian_fixed`: N(0, 1) by Box-Muller on two hashed uniforms, returned as a fixed-point int32
  (z * 2**GAUSS_BITS, rounded half to even). Elements 2k and 2k+1 are r*cos(theta) and
  r*sin(theta) of the pair drawn from words 2k and 2k+1 of a stream keyed apart from the
  Rademacher one. log, cos and sin are NOT libm's (CPU and CUDA libms differ in the last ulp):
  they are fixed polynomials evaluated with separate float64 multiplies and adds (one op each,
  so no FMA contraction), range reduction by torch.frexp (exact) and by the word's top two bits
  (exact), plus IEEE division and sqrt, which are correctly rounded everywhere. The result is
  a deterministic function of the hash bits; the fixed-point integer makes Sum code * z exact in
  int64 (optim/spsa.py `apply`), whatever order messages come in. Truncation error of the
  polynomials is below 1e-11, far under the 2**-12 grid.

word(c) = fmix32(fmix32(c_lo ^ k0) ^ mul32(c_hi, 0x9E3779B9) ^ k1), (k0, k1) = blake2b(seed,
tensor id); murmur3's finalizer on int64 tensors holding 32-bit values, the multiply split into
16-bit halves so nothing overflows.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from optim.errors import ConfigError

TensorId = int | str
MASK32 = 0xFFFFFFFF
PERTURBATIONS = ("rademacher", "gaussian")
GAUSS_BITS = 12
GAUSS_ONE = 1 << GAUSS_BITS  # fixed-point unit of `gaussian_fixed`
GAUSS_KEY = 0x5BD1E995  # xored into k1: the Gaussian stream is not the Rademacher one's
LN2 = 0.6931471805599453
HALF_PI = 1.5707963267948966
_LOG_TERMS = 12  # atanh series terms: |s| <= 1/3, error < (1/3)**25 / 25
_TRIG_TERMS = 10  # Taylor terms on [0, pi/2): error < (pi/2)**20 / 20! ~ 3.8e-15


def tensor_key(seed: int, tensor_id: TensorId) -> tuple[int, int]:
    if not 0 <= seed < 1 << 64:
        raise ConfigError(f"seed must be an unsigned 64-bit integer, got {seed}")
    h = hashlib.blake2b(digest_size=8, person=b"shoal-spsa-key")
    h.update(seed.to_bytes(8, "little"))
    tag = (b"s" + tensor_id.encode()) if isinstance(tensor_id, str) else (
        b"i" + int(tensor_id).to_bytes(8, "little", signed=True))
    h.update(tag)
    key = int.from_bytes(h.digest(), "little")
    return key & MASK32, key >> 32


def mul32(x: Tensor, m: int) -> Tensor:
    """(x * m) mod 2**32 for int64 x in [0, 2**32): split m into 16-bit halves, never overflow."""
    lo, hi = m & 0xFFFF, m >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def fmix32(x: Tensor) -> Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def words(k0: int, k1: int, first: int, last: int, device: torch.device | str) -> Tensor:
    """Hash words for counters first..last (inclusive), int64 holding 32-bit values."""
    c = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    return fmix32(fmix32((c & MASK32) ^ k0) ^ mul32(c >> 32, 0x9E3779B9) ^ k1)


def _check(numel: int, start: int) -> None:
    if numel < 0 or start < 0:
        raise ConfigError(f"numel and start must be >= 0, got {numel}, {start}")


def rademacher(seed: int, tensor_id: TensorId, numel: int, start: int = 0,
               device: torch.device | str = "cpu") -> Tensor:
    """int8 tensor of +-1: elements [start, start + numel) of the stream for (seed, tensor_id).

    Element i is bit (i mod 32) of word(i // 32); bit set means -1. Use the model-wide parameter
    name as tensor_id so that any stage holding the tensor draws the same z.
    """
    _check(numel, start)
    if numel == 0:
        return torch.zeros(0, dtype=torch.int8, device=device)
    k0, k1 = tensor_key(seed, tensor_id)
    first, last = start >> 5, (start + numel - 1) >> 5
    word = words(k0, k1, first, last, device)
    shifts = torch.arange(32, dtype=torch.int64, device=device)
    bits = ((word[:, None] >> shifts) & 1).reshape(-1)
    offset = start - (first << 5)
    return (1 - 2 * bits[offset: offset + numel]).to(torch.int8)


def _horner(x: Tensor, coeffs: list[float]) -> Tensor:
    """coeffs[0] + x * (coeffs[1] + x * (...)): one rounded multiply, then one rounded add."""
    acc = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = torch.mul(acc, x)
        acc = torch.add(acc, c)
    return acc


_LOG_C = [1.0 / (2 * k + 1) for k in range(_LOG_TERMS)]  # atanh(s)/s in powers of s^2
_COS_C = [(-1.0) ** k / math.factorial(2 * k) for k in range(_TRIG_TERMS)]
_SIN_C = [(-1.0) ** k / math.factorial(2 * k + 1) for k in range(_TRIG_TERMS)]


def _neg2_log_unit(w: Tensor) -> Tensor:
    """-2 ln((w + 1) / 2**32) for int64 words w, float64, without libm."""
    u = (w + 1).to(torch.float64)  # in [1, 2**32], exact
    m, e = torch.frexp(u)  # u = m * 2**e, m in [0.5, 1): exact
    s = torch.div(torch.sub(m, 1.0), torch.add(m, 1.0))
    ln_m = torch.mul(torch.mul(s, 2.0), _horner(torch.mul(s, s), _LOG_C))
    ln_u = torch.add(ln_m, torch.mul((e - 32).to(torch.float64), LN2))
    return torch.mul(ln_u, -2.0).clamp_min(0.0)


def _cos_sin(w: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of 2 pi w / 2**32: quadrant from the top two bits, polynomials on the rest."""
    quadrant = w >> 30
    phi = torch.mul((w & 0x3FFFFFFF).to(torch.float64), HALF_PI / (1 << 30))
    phi2 = torch.mul(phi, phi)
    c = _horner(phi2, _COS_C)
    s = torch.mul(phi, _horner(phi2, _SIN_C))
    cos = torch.where(quadrant == 0, c, torch.where(quadrant == 1, -s,
                      torch.where(quadrant == 2, -c, s)))
    sin = torch.where(quadrant == 0, s, torch.where(quadrant == 1, c,
                      torch.where(quadrant == 2, -s, -c)))
    return cos, sin


def gaussian_fixed(seed: int, tensor_id: TensorId, numel: int, start: int = 0,
                   device: torch.device | str = "cpu") -> Tensor:
    """int32 tensor: round(z * 2**GAUSS_BITS) for elements [start, start + numel) of the N(0, 1)
    stream of (seed, tensor_id) (see the module docstring). |z| < 6.7 (u1 >= 2**-32)."""
    _check(numel, start)
    if numel == 0:
        return torch.zeros(0, dtype=torch.int32, device=device)
    k0, k1 = tensor_key(seed, tensor_id)
    first, last = start >> 1, (start + numel - 1) >> 1
    w = words(k0, k1 ^ GAUSS_KEY, 2 * first, 2 * last + 1, device).view(-1, 2)
    r = torch.sqrt(_neg2_log_unit(w[:, 0]))
    cos, sin = _cos_sin(w[:, 1])
    z = torch.stack((torch.mul(r, cos), torch.mul(r, sin)), dim=1).reshape(-1)
    offset = start - 2 * first
    fixed = torch.round(torch.mul(z[offset: offset + numel], float(GAUSS_ONE)))
    return fixed.to(torch.int32)


def check_perturbation(kind: str) -> str:
    if kind not in PERTURBATIONS:
        raise ConfigError(f"perturbation must be one of {', '.join(PERTURBATIONS)}, got {kind!r}")
    return kind


def direction_int(kind: str, seed: int, tensor_id: TensorId, numel: int, start: int = 0,
                  device: torch.device | str = "cpu") -> Tensor:
    """z as integers: +-1 (int8) for rademacher, z * GAUSS_ONE (int32) for gaussian."""
    if check_perturbation(kind) == "rademacher":
        return rademacher(seed, tensor_id, numel, start, device)
    return gaussian_fixed(seed, tensor_id, numel, start, device)


def unit(kind: str) -> int:
    """What `direction_int` multiplies z by."""
    return 1 if check_perturbation(kind) == "rademacher" else GAUSS_ONE


def direction(kind: str, seed: int, tensor_id: TensorId, numel: int, start: int = 0,
              device: torch.device | str = "cpu") -> Tensor:
    """z as float32 (exact: +-1, or a multiple of 2**-12 below 7)."""
    z = direction_int(kind, seed, tensor_id, numel, start, device).to(torch.float32)
    return z if kind == "rademacher" else z / float(GAUSS_ONE)
