"""PDDHead: the trainable part of PDD (InA/MMU adapters, MPA prior, shared de-ResNet students).

Data flow (PDD_SPEC §1), levels i = 1..4 of the CNN teacher (y_i) and the VMamba teacher (z_i,
half the CNN's resolution for i <= 3, the same for i = 4):

    f_b^i = up2(ECA_i(z_i)) + y_i            i = 1, 2, 3      (targets, not detached)
    f_t   = ECA_4(z_4) + y_4                                  (student input)
    a = L1(f_t);  S1 = [L3(L2(a)), L2(a), a]                  (plain path)
    p1, p2 = MPA(f_t);  b = L2(a + p1);  S2 = [L3(b + p2), b, a]   (prior-guided path)

The reference's output list is [S2 (0–2), targets (3–5), S1 (6–8)], each high resolution first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from model.adapters import ChannelAdapter
from model.decoder import init_distillation_weights, make_stage
from model.outputs import HeadOutput
from model.prior import ManifoldPrior

PAPER_CNN_CHANNELS = (256, 512, 1024, 2048)  # wide_resnet50_2 layers 1-4
PAPER_MAMBA_CHANNELS = (192, 384, 768, 768)  # VMamba-Tiny v0 levels 1-4


def _check_channels(name: str, channels: Sequence[int]) -> tuple[int, int, int, int]:
    chans = tuple(int(c) for c in channels)
    if len(chans) != 4 or any(c < 1 for c in chans):
        raise ValueError(f"PDDHead: {name} must be 4 positive ints, got {channels!r}")
    return chans  # type: ignore[return-value]


class PDDHead(nn.Module):
    """The trainable PDD module; state-dict keys equal the reference's ``pdd_decoder``.

    Decoder stages mirror the CNN teacher: ``layer1: c4→c3``, ``layer2: c3→c2``, ``layer3:
    c2→c1``, each with bottleneck width ``c_out // 2`` (see ``model.decoder.stage_width``).
    Adapters ``up_dim_v_rK`` map ``m_K → c_K``; the prior ``mlp`` maps ``c4 → c4//2 → (c3, c2)``.

    Args:
        cnn_channels: channels (c1, c2, c3, c4) of the CNN teacher's 4 levels.
        mamba_channels: channels (m1, m2, m3, m4) of the VMamba teacher's 4 levels.
        prior_sizes: fixed prior target sizes [(h1, w1), (h2, w2)]; ``None`` (default) derives
            them at run time from the decoder outputs. Only the golden fixture needs this.
        adapter_reduction: ECA ``mid = max(c_in, c_out) // adapter_reduction``.
        blocks_per_stage: de-ResNet blocks per decoder stage.
        mamba_fusion: ``"add"`` (PDD_SPEC), ``"detach"`` (InA targets detached) or ``"off"``
            (Teacher M gated out of InA and MMU; ``ModelConfig.mamba_fusion``).
    """

    def __init__(
        self,
        cnn_channels: Sequence[int] = PAPER_CNN_CHANNELS,
        mamba_channels: Sequence[int] = PAPER_MAMBA_CHANNELS,
        prior_sizes: list[tuple[int, int]] | None = None,
        adapter_reduction: int = 4,
        blocks_per_stage: int = 2,
        mamba_fusion: str = "add",
    ) -> None:
        super().__init__()
        if mamba_fusion not in ("add", "detach", "off"):
            raise ValueError(f"PDDHead: mamba_fusion must be add|detach|off, got {mamba_fusion!r}")
        self.mamba_fusion = mamba_fusion
        c1, c2, c3, c4 = self.cnn_channels = _check_channels("cnn_channels", cnn_channels)
        m1, m2, m3, m4 = self.mamba_channels = _check_channels("mamba_channels", mamba_channels)
        # Registration order fixes the state-dict order: layer1..3, up_dim_v_r1..4, mlp.
        self.layer1 = make_stage(c4, c3, blocks_per_stage)
        self.layer2 = make_stage(c3, c2, blocks_per_stage)
        self.layer3 = make_stage(c2, c1, blocks_per_stage)
        self.up_dim_v_r1 = ChannelAdapter(m1, c1, adapter_reduction)
        self.up_dim_v_r2 = ChannelAdapter(m2, c2, adapter_reduction)
        self.up_dim_v_r3 = ChannelAdapter(m3, c3, adapter_reduction)
        self.up_dim_v_r4 = ChannelAdapter(m4, c4, adapter_reduction)
        self.mlp = ManifoldPrior(c4, (c3, c2), target_sizes=prior_sizes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init (``model.decoder.init_distillation_weights``)."""
        init_distillation_weights(self)

    def _check_inputs(self, cnn_feats: Sequence[Tensor], mamba_feats: Sequence[Tensor]) -> None:
        if len(cnn_feats) != 4 or len(mamba_feats) != 4:
            raise ValueError(
                f"PDDHead expects 4 CNN and 4 VMamba maps, got {len(cnn_feats)} and "
                f"{len(mamba_feats)}"
            )
        for i in range(4):
            y, z = cnn_feats[i], mamba_feats[i]
            if y.dim() != 4 or y.shape[1] != self.cnn_channels[i]:
                raise ValueError(
                    f"PDDHead: CNN level {i + 1} must be (B, {self.cnn_channels[i]}, H, W), "
                    f"got {tuple(y.shape)}"
                )
            if z.dim() != 4 or z.shape[1] != self.mamba_channels[i]:
                raise ValueError(
                    f"PDDHead: VMamba level {i + 1} must be (B, {self.mamba_channels[i]}, H, W), "
                    f"got {tuple(z.shape)}"
                )
            scale = 1 if i == 3 else 2
            want = (y.shape[0], y.shape[2], y.shape[3])
            got = (z.shape[0], z.shape[2] * scale, z.shape[3] * scale)
            if want != got:
                raise ValueError(
                    f"PDDHead: level {i + 1} VMamba map {tuple(z.shape)} does not match CNN map "
                    f"{tuple(y.shape)} (VMamba levels 1-3 are half the CNN's size, level 4 equal)"
                )

    def fuse(self, cnn_feats: Sequence[Tensor], mamba_feats: Sequence[Tensor]) -> list[Tensor]:
        """InA targets [f_b^1, f_b^2, f_b^3] (high-res first) and MMU f_t as a 4th entry."""
        if self.mamba_fusion == "off":  # Teacher M gated out: Teacher C's features alone
            return [*cnn_feats[:3], cnn_feats[3]]
        adapters = (self.up_dim_v_r1, self.up_dim_v_r2, self.up_dim_v_r3)
        fused = [
            F.interpolate(ad(z), scale_factor=2, mode="bilinear", align_corners=True) + y
            for ad, z, y in zip(adapters, mamba_feats[:3], cnn_feats[:3], strict=True)
        ]  # (B, c_i, H_i, W_i)
        if self.mamba_fusion == "detach":  # the loss cannot reshape its own targets
            fused = [f.detach() for f in fused]
        fused.append(self.up_dim_v_r4(mamba_feats[3]) + cnn_feats[3])  # (B, c4, h, w)
        return fused

    def forward(self, cnn_feats: Sequence[Tensor], mamba_feats: Sequence[Tensor]) -> HeadOutput:
        """Run adapters, prior and both students.

        Args:
            cnn_feats: 4 maps (B, c_i, H/2^(i+1), W/2^(i+1)), i = 1..4 (H/4 ... H/32).
            mamba_feats: 4 maps (B, m_i, ...) at half the CNN size for i <= 3, equal for i = 4.

        Returns:
            HeadOutput(targets, student1 (plain), student2 (prior-guided)), high-res first.
        """
        self._check_inputs(cnn_feats, mamba_feats)
        fb1, fb2, fb3, f_t = self.fuse(cnn_feats, mamba_feats)
        a = self.layer1(f_t)  # (B, c3, 2h, 2w)
        h, w = a.shape[-2:]
        p1, p2 = self.mlp(f_t, [(h, w), (2 * h, 2 * w)])
        b = self.layer2(a + p1)  # (B, c2, 4h, 4w)
        s2 = [self.layer3(b + p2), b, a]  # prior path first, as the reference orders the calls
        # The reference runs layer1 a second time for the plain path; in training this updates
        # the BN running stats of layer1 twice, which the golden post_state pins.
        a1 = self.layer1(f_t) if self.training else a
        b1 = self.layer2(a1)
        s1 = [self.layer3(b1), b1, a1]
        return HeadOutput(targets=[fb1, fb2, fb3], student1=s1, student2=s2)
