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
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CUDA_BACKEND = "mamba_ssm-cuda"
TORCH_BACKEND = "torch"
BACKEND_ENV = "PDD_SCAN_BACKEND"
DEFAULT_CHUNK = 24  # positions per chunk of the torch scan; CPU time is flat for 16-64 (bench)
_MAX_CHUNK_DECAY = 60.0  # largest log-growth inside one chunk: exp(60) ~ 1e26 fits fp32


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


def _backend_choice() -> str:
    """``PDD_SCAN_BACKEND``: "auto" (default; the kernel on CUDA when installed) or "torch"."""
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", TORCH_BACKEND):
        raise ValueError(f"{BACKEND_ENV} must be 'auto' or 'torch', got {choice!r}")
    return choice


def scan_backend(device: torch.device | str) -> str:
    """Which implementation ``selective_scan`` uses for tensors on ``device``.

    ``PDD_SCAN_BACKEND=torch`` forces the torch scan everywhere (to compare with the kernel, or
    to work around a kernel problem).
    """
    if torch.device(device).type != "cuda" or _backend_choice() == TORCH_BACKEND:
        return TORCH_BACKEND
    return CUDA_BACKEND if _cuda_kernel() is not None else TORCH_BACKEND


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
    u = u.to(dtype).reshape(bt, k, kd // k, length)  # (Bt, K, Dn, L)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dtype).reshape_as(u)
    A = A.to(dtype).reshape(k, kd // k, n)  # (K, Dn, N)
    B, C = B.to(dtype), C.to(dtype)  # (Bt, K, N, L), shared by the Dn channels of a group
    h = u.new_zeros(bt, k, kd // k, n)  # (Bt, K, Dn, N)
    ys = []
    for t in range(length):
        dt = delta[..., t]  # (Bt, K, Dn)
        h = torch.exp(dt[..., None] * A) * h + (dt * u[..., t])[..., None] * B[:, :, None, :, t]
        ys.append((h * C[:, :, None, :, t]).sum(-1))  # (Bt, K, Dn)
    y = torch.stack(ys, dim=-1).view(bt, kd, length)  # (Bt, K*Dn, L)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u.reshape(bt, kd, length)
    return y


def _chunk_plan(delta: torch.Tensor, abs_a_max: torch.Tensor, chunk: int) -> list[tuple[int, int]]:
    """Split [0, L) into chunks of at most ``chunk`` positions with a bounded log-decay span.

    A chunk's span is the log-decay accumulated after its first position,
    ``sum(delta[s+1:e]) * max_n |A|``; it is bounded above by the sum over those positions of
    the per-position maximum over all channels, which is kept under ``_MAX_CHUNK_DECAY`` so the
    in-chunk growth factors never overflow. A chunk of one position always fits.
    """
    bound = (delta * abs_a_max[..., None]).flatten(0, -2).amax(dim=0)  # (L,) max step decay
    plan, start, span = [], 0, 0.0
    for t, step in enumerate(bound.tolist()[1:], start=1):
        span += step
        if t - start >= chunk or span > _MAX_CHUNK_DECAY:
            plan.append((start, t))
            start, span = t, 0.0
    plan.append((start, delta.shape[-1]))
    return plan


def _chunk(
    h: torch.Tensor,
    dl: torch.Tensor,
    du: torch.Tensor,
    abs_a: torch.Tensor,
    Bc: torch.Tensor,
    Cc: torch.Tensor,
    inplace: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of T positions: returns (y (Bt, K, Dn, T), last state (Bt, K, Dn, N)).

    Args:
        h: state carried in (Bt, K, Dn, N).
        dl, du: delta and delta * u of the chunk (Bt, K, Dn, T).
        abs_a: -A (K, Dn, N, 1).
        Bc, Cc: B and C of the chunk (Bt, K, 1, N, T).
        inplace: reuse buffers (only when no gradient is recorded).
    """
    steps = F.pad(dl[..., 1:], (1, 0)).unsqueeze(-2)  # (Bt, K, Dn, 1, T), 0 at the first
    growth = torch.mul(abs_a, steps)  # (Bt, K, Dn, N, T) log-growth per step, in [0, cap]
    carry = torch.exp(-abs_a[..., 0] * dl[..., :1]) * h  # (Bt, K, Dn, N) h_in decayed by step 0
    x = torch.mul(du.unsqueeze(-2), Bc)  # (Bt, K, Dn, N, T) delta * B * u
    # w_t = exp(E_t) as a running product of per-step growths: its rounding error grows with
    # the number of steps (like the sequential loop), not with the size of E_t.
    if inplace:
        w = growth.exp_().cumprod_(dim=-1)
        x.mul_(w)[..., 0] += carry
        hs = x.cumsum_(dim=-1).div_(w)  # (Bt, K, Dn, N, T) states
        h_last = hs[..., -1].clone()
        return hs.mul_(Cc).sum(dim=-2), h_last
    w = torch.cumprod(torch.exp(growth), dim=-1)
    wx = w * x
    wx[..., 0] += carry
    hs = torch.cumsum(wx, dim=-1) / w  # (Bt, K, Dn, N, T) states
    return (hs * Cc).sum(dim=-2), hs[..., -1]


def _torch_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    k: int,
    chunk: int,
) -> torch.Tensor:
    """Chunked scan: a loop over chunks, each computed in one vectorised pass.

    Inside a chunk, with E_t = |A| * sum(delta) over the chunk's positions 1..t (E_0 = 0; E grows
    along t and ``_chunk_plan`` keeps it below ``_MAX_CHUNK_DECAY``) and x_s = delta_s B_s u_s::

        h_t = (exp(-|A| delta_0) h_in + sum_{s<=t} exp(E_s) x_s) / exp(E_t)

    so every input is weighted by exp(E_s - E_t) <= 1, as in the sequential loop. Inputs are
    float32 (or float64), ``delta`` already softplus-ed; returns y (Bt, K*Dn, L) without D.
    """
    bt, kd, length = u.shape
    dn, n = kd // k, A.shape[1]
    delta = delta.reshape(bt, k, dn, length)
    du = delta * u.reshape(bt, k, dn, length)  # (Bt, K, Dn, L)
    abs_a = (-A).reshape(k, dn, n, 1)  # (K, Dn, N, 1)
    Bg, Cg = B.unsqueeze(2), C.unsqueeze(2)  # (Bt, K, 1, N, L)
    inplace = not (torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C)))
    h = u.new_zeros(bt, k, dn, n)  # state carried between chunks
    y = u.new_empty(bt, k, dn, length)
    for s, e in _chunk_plan(delta, abs_a.amax(dim=2)[..., 0], chunk):
        y[..., s:e], h = _chunk(
            h, delta[..., s:e], du[..., s:e], abs_a, Bg[..., s:e], Cg[..., s:e], inplace
        )
    return y.view(bt, kd, length)


def _cuda_scan(u, delta, A, B, C, D, delta_bias, delta_softplus) -> torch.Tensor:
    """mamba-ssm's kernel, with the dtypes it requires: ``delta``, ``B``, ``C`` in ``u``'s
    dtype (fp32, or bf16/fp16 under autocast), ``A``, ``D``, ``delta_bias`` in float32."""
    kernel = _cuda_kernel()
    delta, B, C = delta.to(u.dtype), B.to(u.dtype), C.to(u.dtype)
    D = None if D is None else D.float()
    delta_bias = None if delta_bias is None else delta_bias.float()
    y = kernel(u, delta, A.float(), B, C, D, delta_bias=delta_bias, delta_softplus=delta_softplus)
    return y.float()


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

    float64 inputs (precision tests) always take the torch scan; see ``scan_backend``.

    Args: see the module docstring for the layout; ``A`` must be <= 0 (decaying states).
        chunk: positions per chunk of the torch scan (ignored by the CUDA kernel).

    Returns:
        y (Bt, K*Dn, L), float32.

    Raises:
        ScanShapeError: the tensors do not have the documented layout.
    """
    bt, kd, length, k, n = _check_shapes(u, delta, A, B, C, D, delta_bias)
    if scan_backend(u.device) == CUDA_BACKEND and u.dtype != torch.float64:
        return _cuda_scan(u, delta, A, B, C, D, delta_bias, delta_softplus)
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
        y = torch.addcmul(y, D.to(dtype)[:, None], u)  # y + D * u
    return y
