"""Selective scan (the S6 recurrence of Mamba) behind one function.

``selective_scan`` uses mamba-ssm's CUDA kernel when it is importable and the tensors are on
CUDA, and otherwise a vectorised pure-torch scan. ``selective_scan_reference`` is the plain
sequential loop with the same signature; a parity test pins the two together.

Layout (mamba-ssm's ``selective_scan_fn``), with ``K`` groups of ``Dn`` channels each::

    u, delta     (Bt, K*Dn, L)
    A            (K*Dn, N)          A <= 0 (VMamba passes -exp(A_logs))
    B, C         (Bt, K, N, L)      shared by the Dn channels of a group
    D, delta_bias (K*Dn,)
    y            (Bt, K*Dn, L)      float32

Recurrence per channel d and state n::

    delta = softplus(delta + delta_bias)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = sum_n C_t * h_t + D * u_t
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CUDA_BACKEND = "mamba_ssm-cuda"
TORCH_BACKEND = "torch"
DEFAULT_CHUNK = 64  # positions per chunk of the torch scan; tuned on CPU (see model/bench.py)
_MAX_CHUNK_DECAY = 40.0  # largest log-decay spanned inside one chunk (exp(40) ~ 2e17 fits fp32)


class ScanShapeError(ValueError):
    """The tensors passed to a selective scan do not have the documented layout."""


@functools.lru_cache(maxsize=1)
def _cuda_kernel() -> Callable[..., torch.Tensor] | None:
    """The one probe for mamba-ssm's CUDA kernel (None when mamba-ssm is absent)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as err:  # optional extra `cuda`; the torch scan takes over
        logger.info("mamba-ssm CUDA selective scan unavailable (%s); using the torch scan", err)
        return None
    return selective_scan_fn


def scan_backend(device: torch.device | str) -> str:
    """Which implementation ``selective_scan`` uses for tensors on ``device``."""
    if torch.device(device).type == "cuda" and _cuda_kernel() is not None:
        return CUDA_BACKEND
    return TORCH_BACKEND


def _check_shapes(u, delta, A, B, C, D, delta_bias) -> tuple[int, int, int, int, int]:
    """Validate the layout; returns (Bt, KD, L, K, N)."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ScanShapeError(
            f"u and delta must be (Bt, K*Dn, L), got {tuple(u.shape)}, {tuple(delta.shape)}"
        )
    bt, kd, length = u.shape
    if A.dim() != 2 or A.shape[0] != kd:
        raise ScanShapeError(f"A must be ({kd}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    if B.dim() != 4 or B.shape[0] != bt or B.shape[2] != n or B.shape[3] != length:
        raise ScanShapeError(f"B must be ({bt}, K, {n}, {length}), got {tuple(B.shape)}")
    k = B.shape[1]
    if C.shape != B.shape or kd % k != 0:
        raise ScanShapeError(
            f"C must equal B's shape {tuple(B.shape)} and K must divide {kd}, "
            f"got C {tuple(C.shape)}"
        )
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and vec.shape != (kd,):
            raise ScanShapeError(f"{name} must be ({kd},), got {tuple(vec.shape)}")
    return bt, kd, length, k, n


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the inputs are float64 (used by precision tests)."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _prepare_delta(
    delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool, dtype: torch.dtype
) -> torch.Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    return F.softplus(delta) if delta_softplus else delta


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """Plain sequential selective scan in fp32: one loop step per position.

    Args: see the module docstring for the layout.

    Returns:
        y (Bt, K*Dn, L), float32.
    """
    bt, kd, length, k, n = _check_shapes(u, delta, A, B, C, D, delta_bias)
    dtype = _compute_dtype(u)
    u, A = u.to(dtype), A.to(dtype)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    Bf = B.to(dtype).repeat_interleave(kd // k, dim=1)  # (Bt, KD, N, L)
    Cf = C.to(dtype).repeat_interleave(kd // k, dim=1)  # (Bt, KD, N, L)
    h = u.new_zeros(bt, kd, n)
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A)  # (Bt, KD, N)
        h = decay * h + (delta[:, :, t] * u[:, :, t])[:, :, None] * Bf[:, :, :, t]
        ys.append((h * Cf[:, :, :, t]).sum(-1))  # (Bt, KD)
    y = torch.stack(ys, dim=-1)  # (Bt, KD, L)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u
    return y


def _chunk_plan(delta: torch.Tensor, abs_a_max: torch.Tensor, chunk: int) -> list[tuple[int, int]]:
    """Split [0, L) into chunks whose log-decay span stays under ``_MAX_CHUNK_DECAY``.

    A chunk's span for one channel is ``max_n |A| * sum(delta)`` over its positions after the
    first; chunks that exceed the bound in any channel are halved until they fit (a chunk of
    one position always fits), so the in-chunk weights ``exp(span)`` never overflow.
    """
    length = delta.shape[-1]
    cum = torch.cumsum(delta, dim=-1) * abs_a_max[..., None]  # (Bt, K, Dn, L) scaled decay
    pending = [(s, min(s + chunk, length)) for s in range(0, length, chunk)]
    plan: list[tuple[int, int]] = []
    while pending:
        starts = torch.tensor([s for s, _ in pending], device=delta.device)
        ends = torch.tensor([e - 1 for _, e in pending], device=delta.device)
        span = (cum[..., ends] - cum[..., starts]).flatten(0, -2).amax(dim=0)  # (n_pending,)
        nxt = []
        for (s, e), ok in zip(pending, (span <= _MAX_CHUNK_DECAY).tolist(), strict=True):
            if ok or e - s == 1:
                plan.append((s, e))
            else:
                mid = (s + e) // 2
                nxt += [(s, mid), (mid, e)]
        pending = nxt
    return sorted(plan)


def _torch_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    k: int,
    chunk: int,
) -> torch.Tensor:
    """Chunked scan: a cumulative sum of log-decays inside each chunk, a loop over chunks.

    Inside a chunk, with E_t = |A| * sum(delta) from the chunk's first position to t (so
    E >= 0 grows along t and stays below ``_MAX_CHUNK_DECAY``)::

        h_t = (exp(-|A| delta_first) h_in + sum_{s<=t} exp(E_s) x_s) / exp(E_t)

    which only ever multiplies the inputs by exp(E_s - E_t) <= 1, like the sequential loop.
    Inputs are float32, ``delta`` already softplus-ed; returns y (Bt, K*Dn, L) without D.
    """
    bt, kd, length = u.shape
    dn, n = kd // k, A.shape[1]
    delta = delta.view(bt, k, dn, length)
    du = delta * u.view(bt, k, dn, length)  # (Bt, K, Dn, L)
    abs_a = (-A).view(k, dn, n, 1)  # (K, Dn, N, 1)
    Bg, Cg = B.unsqueeze(2), C.unsqueeze(2)  # (Bt, K, 1, N, L)
    h = u.new_zeros(bt, k, dn, n)  # state carried between chunks
    y = u.new_empty(bt, k, dn, length)
    for s, e in _chunk_plan(delta, abs_a.amax(dim=2)[..., 0], chunk):
        dl = delta[..., s:e]  # (Bt, K, Dn, T)
        rel = torch.cumsum(dl, dim=-1)
        rel = (rel - rel[..., :1]).unsqueeze(-2)  # (Bt, K, Dn, 1, T), 0 at the first position
        w = torch.exp(abs_a * rel)  # (Bt, K, Dn, N, T), 1 <= w <= exp(_MAX_CHUNK_DECAY)
        wx = w * (du[..., None, s:e] * Bg[..., s:e])  # (Bt, K, Dn, N, T)
        carry = torch.exp(-abs_a[..., 0] * dl[..., :1]) * h  # (Bt, K, Dn, N)
        wx = torch.cat([wx[..., :1] + carry[..., None], wx[..., 1:]], dim=-1)
        hs = torch.cumsum(wx, dim=-1) / w  # (Bt, K, Dn, N, T)
        y[..., s:e] = (hs * Cg[..., s:e]).sum(dim=-2)
        h = hs[..., -1]
    return y.view(bt, kd, length)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Selective scan: mamba-ssm's CUDA kernel on CUDA when installed, else the torch scan.

    Args: see the module docstring for the layout; ``A`` must be <= 0 (decaying states).
        chunk: positions per chunk of the torch scan (ignored by the CUDA kernel).

    Returns:
        y (Bt, K*Dn, L), float32.

    Raises:
        ScanShapeError: the tensors do not have the documented layout.
    """
    bt, kd, length, k, n = _check_shapes(u, delta, A, B, C, D, delta_bias)
    if scan_backend(u.device) == CUDA_BACKEND:
        kernel = _cuda_kernel()
        y = kernel(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=delta_softplus)
        return y.float()
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if bool((A > 0).any()):
        raise ValueError("A must be <= 0 (decaying states); pass -exp(A_logs)")
    dtype = _compute_dtype(u)
    u, A = u.to(dtype), A.to(dtype)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype)
    if not delta_softplus and bool((delta < 0).any()):
        raise ValueError("delta must be >= 0 after delta_bias when delta_softplus is False")
    y = _torch_scan(u, delta, A, B.to(dtype), C.to(dtype), k, chunk)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u
    return y
