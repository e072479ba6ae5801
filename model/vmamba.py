"""VMamba "v0" (vanilla VMamba-Tiny): the frozen Mamba teacher of PDD.

Module names follow MzeroMiko/VMamba's root ``vmamba.py`` (the file PDD runs), so the published
``vssmtiny_dp01_ckpt_epoch_292.pth`` loads strictly after the old-name renames of
``load_vmamba_checkpoint`` (as a ``{"model": ...}`` file of tensors; a file that also holds
a training config object is refused, see ``model.weight_files``). Everything after the patch
embedding is channel-last (B, H, W, C).
The selective scan comes from ``model.scan`` (CUDA kernel when available, torch otherwise).
DropPath is omitted: the teacher is only ever used frozen, in eval mode.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.scan import selective_scan
from model.weight_files import WeightFileError, read_weights

LN_EPS = 1e-5


class VMambaWeightsError(ValueError):
    """A VMamba checkpoint does not match the model (missing, unexpected or mis-shaped keys)."""


class VMambaConfigError(ValueError):
    """A VMamba configuration value is invalid; the message names the key."""


@dataclass(frozen=True)
class VSSMConfig:
    """Architecture of a VMamba v0 classifier.

    Attributes:
        depths: Blocks per stage.
        dims: Channels of the first stage; stage i has ``dims * 2**i``.
        patch_size: Patch-embedding kernel and stride.
        in_chans: Input channels.
        num_classes: Classifier outputs (the classifier is kept so checkpoints load strictly).
        d_state: SSM state size N.
        ssm_ratio: d_inner / d_model of each SS2D.
    """

    depths: tuple[int, ...] = (2, 2, 9, 2)
    dims: int = 96
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    d_state: int = 16
    ssm_ratio: float = 2.0

    def __post_init__(self) -> None:
        if not self.depths or any(d < 1 for d in self.depths):
            raise VMambaConfigError(f"depths must be positive integers, got {self.depths}")
        for key in ("dims", "patch_size", "in_chans", "num_classes", "d_state"):
            if getattr(self, key) < 1:
                raise VMambaConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.ssm_ratio <= 0:
            raise VMambaConfigError(f"ssm_ratio must be > 0, got {self.ssm_ratio}")

    @property
    def stage_dims(self) -> list[int]:
        """Channels of each stage."""
        return [self.dims * 2**i for i in range(len(self.depths))]


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module (keeps the reference's Sequential indices)."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class PatchMergeCat(nn.Module):
    """Swin patch merging's gather: (B, H, W, C) -> (B, H/2, W/2, 4C), zero-padding odd sizes.

    The four sub-grids are concatenated in the order (even row, even col), (odd row, even col),
    (even row, odd col), (odd row, odd col).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-3:-1]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        parts = [x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :]]
        parts += [x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]]
        return torch.cat(parts, dim=-1)  # (B, H/2, W/2, 4C)


def _dt_bias_init(d_inner: int, k: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> torch.Tensor:
    """Inverse softplus of log-uniform dt in [dt_min, dt_max] (floor 1e-4), shape (K, Dn)."""
    log_dt = torch.rand(k, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt).clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))


class SS2D(nn.Module):
    """2D selective scan (forward_type v0): four directions, each a selective scan of length H*W.

    Parameter registration order matters: it fixes the state_dict key order of the reference.
    """

    def __init__(self, d_model: int, d_state: int = 16, ssm_ratio: float = 2.0, k: int = 4) -> None:
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        dt_rank = math.ceil(d_model / 16)
        self.d_state, self.dt_rank, self.k = d_state, dt_rank, k
        bound = d_inner**-0.5
        self.x_proj_weight = nn.Parameter(
            torch.empty(k, dt_rank + 2 * d_state, d_inner).uniform_(-bound, bound)
        )  # (K, R + 2N, Dn): dt, B, C
        a_init = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))
        self.A_logs = nn.Parameter(a_init.repeat(k * d_inner, 1))  # (K*Dn, N), row k*Dn + d
        self.Ds = nn.Parameter(torch.ones(k * d_inner))  # (K*Dn,)
        dt_bound = dt_rank**-0.5
        self.dt_projs_weight = nn.Parameter(
            torch.empty(k, d_inner, dt_rank).uniform_(-dt_bound, dt_bound)
        )  # (K, Dn, R)
        self.dt_projs_bias = nn.Parameter(_dt_bias_init(d_inner, k))  # (K, Dn)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.act = nn.SiLU()
        self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner, bias=True)
        self.out_norm = nn.LayerNorm(d_inner, eps=LN_EPS)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, H, W, C) -> conv branch (B, Dn, H, W) and gate SiLU(z) (B, H, W, Dn)."""
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (B, H, W, Dn) each
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))  # (B, Dn, H, W)
        return x, self.act(z)

    def _scan_args(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The four-direction selective-scan inputs for x (B, Dn, H, W), fp32."""
        b, _, h, w = x.shape
        length = h * w
        x_hw = x.flatten(2)  # (B, Dn, L) row-major
        x_wh = x.transpose(2, 3).flatten(2)  # (B, Dn, L) column-major
        xs = torch.stack([x_hw, x_wh, x_hw.flip(-1), x_wh.flip(-1)], dim=1)  # (B, K, Dn, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)  # (B, K, R+2N, L)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)  # (B, K, Dn, L)
        return {
            "u": xs.reshape(b, -1, length).float(),  # (B, K*Dn, L)
            "delta": dts.reshape(b, -1, length).float(),  # (B, K*Dn, L)
            "A": -torch.exp(self.A_logs.float()),  # (K*Dn, N)
            "B": Bs.contiguous().float(),  # (B, K, N, L)
            "C": Cs.contiguous().float(),  # (B, K, N, L)
            "D": self.Ds.float(),  # (K*Dn,)
            "delta_bias": self.dt_projs_bias.float().view(-1),  # (K*Dn,)
        }

    def scan_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ``selective_scan`` keyword arguments this block builds for x (B, H, W, C)."""
        return self._scan_args(self._branches(x)[0])

    def _cross_scan(self, x: torch.Tensor) -> torch.Tensor:
        """Scan all four directions of x (B, Dn, H, W); returns the merged y (B, Dn, L)."""
        b, dn, h, w = x.shape
        length = h * w
        out = selective_scan(**self._scan_args(x), delta_softplus=True)  # (B, K*Dn, L)
        out = out.view(b, self.k, dn, length)
        inv = out[:, 2:4].flip(-1)  # (B, 2, Dn, L): directions 2, 3 back in forward order
        wh = out[:, 1].view(b, dn, w, h).transpose(2, 3).reshape(b, dn, length)
        inv_wh = inv[:, 1].view(b, dn, w, h).transpose(2, 3).reshape(b, dn, length)
        return out[:, 0] + inv[:, 0] + wh + inv_wh  # (B, Dn, L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, _ = x.shape
        x, z = self._branches(x)
        y = self._cross_scan(x).transpose(1, 2)  # (B, L, Dn)
        y = self.out_norm(y).view(b, h, w, -1)  # (B, H, W, Dn)
        return self.out_proj(y * z)


class VSSBlock(nn.Module):
    """x + op(norm(x)); no MLP (mlp_ratio 0), DropPath omitted (eval-only teacher)."""

    def __init__(self, dim: int, d_state: int, ssm_ratio: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.op = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.op(self.norm(x))  # (B, H, W, C)


def _downsample(dim: int, out_dim: int) -> nn.Sequential:
    """Patch merging v1: gather 2x2 (index 0), LayerNorm(4C) (index 1), Linear 4C->out (2)."""
    return nn.Sequential(
        PatchMergeCat(), nn.LayerNorm(4 * dim, eps=LN_EPS), nn.Linear(4 * dim, out_dim, bias=False)
    )


class VSSM(nn.Module):
    """VMamba v0 classifier; ``forward_features`` gives PDD's four teacher features."""

    def __init__(self, config: VSSMConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or VSSMConfig()
        dims = cfg.stage_dims
        self.patch_embed = nn.Sequential(
            nn.Conv2d(cfg.in_chans, dims[0], cfg.patch_size, stride=cfg.patch_size, bias=True),
            Permute(0, 2, 3, 1),
            nn.LayerNorm(dims[0], eps=LN_EPS),
        )
        self.layers = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            last = i == len(cfg.depths) - 1
            blocks = [VSSBlock(dims[i], cfg.d_state, cfg.ssm_ratio) for _ in range(depth)]
            down = nn.Identity() if last else _downsample(dims[i], dims[i + 1])
            self.layers.append(
                nn.Sequential(OrderedDict(blocks=nn.Sequential(*blocks), downsample=down))
            )
        self.classifier = nn.Sequential(
            OrderedDict(
                norm=nn.LayerNorm(dims[-1], eps=LN_EPS),
                permute=Permute(0, 3, 1, 2),
                avgpool=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(1),
                head=nn.Linear(dims[-1], cfg.num_classes),
            )
        )
        self.feature_info = self._feature_info()
        self.apply(self._init_weights)

    def _feature_info(self) -> list[dict[str, int]]:
        dims, n = self.config.stage_dims, len(self.config.depths)
        info = []
        for i in range(n):
            out_ch = dims[min(i + 1, n - 1)]
            reduction = self.config.patch_size * 2 ** min(i + 1, n - 1)
            info.append({"num_chs": out_ch, "reduction": reduction})
        return info

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """PDD's teacher features: the output of each layer (after its downsample).

        Args:
            x: (B, in_chans, H, W) normalised images.

        Returns:
            Four tensors (B, C_i, H_i, W_i) as declared by ``feature_info`` (permuted views).
        """
        if x.dim() != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"expected (B, {self.config.in_chans}, H, W), got {tuple(x.shape)}")
        x = self.patch_embed(x)  # (B, H/4, W/4, C0)
        feats = []
        for layer in self.layers:
            x = layer(x)  # (B, H_i, W_i, C_i)
            feats.append(x.permute(0, 3, 1, 2))  # (B, C_i, H_i, W_i)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x)


def vmamba_tiny_v0() -> VSSM:
    """VMamba-Tiny v0 (depths 2-2-9-2, dims 96): PDD's Mamba teacher, random weights."""
    return VSSM(VSSMConfig())


def vmamba_small_fixture() -> VSSM:
    """The golden-fixture size (depths 1-1-2-1, dims 16); runs in milliseconds on CPU."""
    return VSSM(VSSMConfig(depths=(1, 1, 2, 1), dims=16))


_RENAMES = [
    (re.compile(r"^patch_embed\.proj\."), "patch_embed.0."),
    (re.compile(r"^patch_embed\.norm\."), "patch_embed.2."),
    (re.compile(r"(\.blocks\.\d+)\.ln_1\."), r"\1.norm."),
    (re.compile(r"(\.blocks\.\d+)\.self_attention\."), r"\1.op."),
    (re.compile(r"\.downsample\.norm\."), ".downsample.1."),
    (re.compile(r"\.downsample\.reduction\."), ".downsample.2."),
    (re.compile(r"^norm\."), "classifier.norm."),
    (re.compile(r"^head\."), "classifier.head."),
]


def rename_old_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the old VMamba key names (``ln_1``, ``self_attention``, ``head`` ...) to ours."""
    out = {}
    for key, value in state.items():
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def _read_state(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    try:
        state = read_weights(path, sha256=sha256)
    except WeightFileError as err:  # re-raised as this module's error, message unchanged
        raise VMambaWeightsError(f"VMamba checkpoint: {err}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VMambaWeightsError(f"{path} holds no tensor state_dict (nor one under 'model')")
    return state


def _first(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_vmamba_checkpoint(model: VSSM, path: str | Path, *, sha256: str | None = None) -> VSSM:
    """Load VMamba weights strictly (a .pth/.pt or .safetensors file) into ``model``.

    Unwraps a ``"model"`` entry and applies the old-name renames first. The file is read by
    ``model.weight_files.read_weights``: safetensors, or ``torch.load(weights_only=True)``; a
    .pth holding other objects (e.g. a training run's config) is refused, never unpickled.

    Args:
        model: the VMamba to fill.
        path: the weights file.
        sha256: the file's expected sha256, checked on its bytes before it is parsed.

    Raises:
        VMambaWeightsError: missing, refused or unreadable file, wrong sha256, or missing,
            unexpected or mis-shaped keys (the message names the file and the first few keys).
    """
    path = Path(path)
    state = rename_old_keys(_read_state(path, sha256))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_first(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {_first(shapes)}")
    if problems:
        raise VMambaWeightsError(f"{path} does not match the VMamba model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model
