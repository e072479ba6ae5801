"""Golden checks for the PDD head, loss and anomaly map against ``pdd_decoder_*`` fixtures.

See ``shared/golden/FORMAT_pdd_decoder.md``. The reference's 9 outputs map onto ``HeadOutput`` as
0–2 → student2 (prior path), 3–5 → targets (fused f_b), 6–8 → student1 (plain path).
Tolerances: outputs 1e-4 × max|ref|, maps 1e-5 absolute, losses and the native outputs'
sums 1e-5 relative.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from model.anomaly_map import anomaly_map, gaussian_blur, level_maps
from model.golden.checks import GoldenCheck
from model.head import PDDHead
from model.loss import W_COS_S2_T, W_DIVERSITY, W_MSE_S2_T, W_MSE_T_S1, flat_cosine, pdd_loss
from model.outputs import HeadOutput

log = logging.getLogger(__name__)

OUT_NAMES = (
    "vssm_fc",
    "vssm_fb",
    "vssm_fa",
    "fuss_c",
    "fuss_b",
    "fuss_a",
    "res_fc",
    "res_fb",
    "res_fa",
)
OUT_TOL = 1e-4  # × max|ref|
MAP_TOL = 1e-5  # absolute
LOSS_TOL = 1e-5  # relative
STATS_TOL = 1e-5  # relative, native output statistics
SCALE_SUFFIX = ".__scale__"


def _open(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"golden fixture missing: {path}")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load_decoder_state(path: Path) -> dict[str, Tensor]:
    """Decode ``pdd_decoder_state.safetensors`` (int8 conv weights × power-of-two scale)."""
    raw = _open(path)
    state = {}
    for key, t in raw.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        scale = raw.get(key + SCALE_SUFFIX)
        state[key] = t.float() * scale if scale is not None else t
    return state


def flat_outputs(out: HeadOutput) -> list[Tensor]:
    """The reference's output list order: [student2, targets, student1], each high-res first."""
    return [*out.student2, *out.targets, *out.student1]


@contextmanager
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _abs(name: str, got: Tensor, ref: Tensor, tol: float) -> GoldenCheck:
    if got.shape != ref.shape:
        return GoldenCheck(name, float("inf"), tol, False)
    err = (got.detach().double() - ref.double()).abs().max().item()
    return GoldenCheck(name, err, tol, err <= tol)


def _rel_out(name: str, got: Tensor, ref: Tensor, scale: float | None = None) -> GoldenCheck:
    scale = ref.abs().max().item() if scale is None else scale
    return _abs(name, got, ref, OUT_TOL * max(scale, 1e-12))


def _loss(name: str, got: Tensor, ref: Tensor) -> GoldenCheck:
    return _abs(name, got.reshape(-1), ref.reshape(-1), LOSS_TOL * abs(ref.item()))


def _loss_checks(prefix: str, out: HeadOutput, io: dict[str, Tensor]) -> list[GoldenCheck]:
    parts = pdd_loss(out)
    checks = [_loss(f"{prefix}.loss", parts.total, io[f"{prefix}.loss"])]
    named = {
        "loss_l_r_m": W_MSE_S2_T * parts.mse_s2_t + W_COS_S2_T * parts.cos_s2_t,
        "loss_l_f_s": W_MSE_T_S1 * parts.mse_t_s1,
        "loss_l_s_s": W_DIVERSITY * parts.diversity,
    }
    for key, value in named.items():
        if f"{prefix}.{key}" in io:
            checks.append(_loss(f"{prefix}.{key}", value, io[f"{prefix}.{key}"]))
    return checks


def _build_head(state: dict[str, Tensor], prior_sizes: list[tuple[int, int]] | None) -> PDDHead:
    head = PDDHead(prior_sizes=prior_sizes)
    head.load_state_dict(state, strict=True)
    return head


def check_keys(golden_dir: Path) -> list[GoldenCheck]:
    """State-dict keys, shapes and order, and the parameter count, against the manifest."""
    path = golden_dir / "pdd_decoder_keys.json"
    if not path.is_file():
        raise FileNotFoundError(f"golden fixture missing: {path}")
    manifest = json.loads(path.read_text())
    head = PDDHead()
    ref = [(e["key"], tuple(e["shape"])) for e in manifest["keys"]]
    mine = [(k, tuple(v.shape)) for k, v in head.state_dict().items()]
    n_params = sum(p.numel() for p in head.parameters())
    n_bad = sum(a != b for a, b in zip(ref, mine, strict=False)) + abs(len(ref) - len(mine))
    return [
        GoldenCheck("pdd_decoder/keys", float(n_bad), 0.0, n_bad == 0),
        GoldenCheck(
            "pdd_decoder/num_parameters",
            float(abs(n_params - manifest["num_parameters"])),
            0.0,
            n_params == manifest["num_parameters"],
        ),
    ]


def _post_state_checks(head: PDDHead, io: dict[str, Tensor]) -> list[GoldenCheck]:
    state = head.state_dict()
    checks = []
    prefix = "train.post_state."
    for key in sorted(k for k in io if k.startswith(prefix)):
        ref, got = io[key], state[key[len(prefix) :]]
        name = f"reduced/{key}"
        if key.endswith("num_batches_tracked"):
            checks.append(_abs(name, got, ref, 0.0))
        else:
            checks.append(_rel_out(name, got, ref))
    return checks


def _map_checks(
    prefix: str, out: HeadOutput, io: dict[str, Tensor], size: int
) -> list[GoldenCheck]:
    levels = level_maps(out, size)  # (B, 6, S, S) float32
    n = len(out.targets)
    lv = levels.double()
    raw = lv[:, :n].sum(dim=1) + lv[:, n:].sum(dim=1)  # (B, S, S) float64
    blurred = gaussian_blur(raw, 4.0)  # (B, S, S) float64
    scores = blurred.amax(dim=(1, 2))
    return [
        _abs(f"{prefix}/eval.level_maps_f32", levels, io["eval.level_maps_f32"], MAP_TOL),
        _abs(f"{prefix}/eval.anomaly_map_raw_f64", raw, io["eval.anomaly_map_raw_f64"], MAP_TOL),
        _abs(f"{prefix}/eval.anomaly_map_f64", blurred, io["eval.anomaly_map_f64"], MAP_TOL),
        _abs(
            f"{prefix}/eval.anomaly_map_f32", blurred.float(), io["eval.anomaly_map_f32"], MAP_TOL
        ),
        _abs(f"{prefix}/eval.image_score_f64", scores, io["eval.image_score_f64"], MAP_TOL),
        _abs(
            f"{prefix}/eval.ref_batch_anomaly_map_f64",
            blurred[0],
            io["eval.ref_batch_anomaly_map_f64"],
            MAP_TOL,
        ),
        _abs(
            f"{prefix}/eval.ref_batch_image_score_f64",
            scores[:1],
            io["eval.ref_batch_image_score_f64"],
            MAP_TOL,
        ),
    ]


def _anomaly_output_check(
    prefix: str, out: HeadOutput, io: dict[str, Tensor], size: int
) -> list[GoldenCheck]:
    """The public ``anomaly_map`` (float32 maps and scores) against the float64 reference."""
    res = anomaly_map(out, size)
    return [
        _abs(f"{prefix}/anomaly_map().maps", res.maps, io["eval.anomaly_map_f64"], MAP_TOL),
        _abs(f"{prefix}/anomaly_map().scores", res.scores, io["eval.image_score_f64"], MAP_TOL),
    ]


def _inputs(io: dict[str, Tensor], prefix: str, div: float) -> tuple[list[Tensor], list[Tensor]]:
    res = [io[f"{prefix}.res{i}"].float() / div for i in range(4)]
    vm = [io[f"{prefix}.vm{i}"].float() / div for i in range(4)]
    return res, vm


def check_reduced(golden_dir: Path, state: dict[str, Tensor]) -> list[GoldenCheck]:
    """``pdd_decoder_io.safetensors``: train/eval outputs, losses, BN post_state, maps."""
    io = _open(golden_dir / "pdd_decoder_io.safetensors")
    res, vm = _inputs(io, "input", 1.0)
    size = res[0].shape[-1] * 4
    h = res[3].shape[-1]
    sizes = [(2 * h, 2 * h), (4 * h, 4 * h)]  # the fixture's mlp.target_sizes override
    checks = []
    head = _build_head(state, sizes).train()
    out = head(res, vm)
    for j, (name, t) in enumerate(zip(OUT_NAMES, flat_outputs(out), strict=True)):
        checks.append(_rel_out(f"reduced/train.out{j}_{name}", t, io[f"train.out{j}_{name}"]))
    checks += _loss_checks("train", out, io)
    checks += _post_state_checks(head, io)
    head = _build_head(state, sizes).eval()
    with torch.no_grad():
        out = head(res, vm)
        for j, (name, t) in enumerate(zip(OUT_NAMES, flat_outputs(out), strict=True)):
            checks.append(_rel_out(f"reduced/eval.out{j}_{name}", t, io[f"eval.out{j}_{name}"]))
        checks += _loss_checks("eval", out, io)
        checks += _map_checks("reduced", out, io, size)
        checks += _anomaly_output_check("reduced", out, io, size)
    return [c._replace(name=c.name if "/" in c.name else f"reduced/{c.name}") for c in checks]


def _stats(t: Tensor) -> Tensor:
    x = t.detach().double()
    return torch.stack([x.sum(), (x * x).sum(), x.abs().sum(), x.max(), x.min()])


def _native_output_checks(mode: str, out: HeadOutput, io: dict[str, Tensor]) -> list[GoldenCheck]:
    checks = []
    for j, (name, t) in enumerate(zip(OUT_NAMES, flat_outputs(out), strict=True)):
        key = f"{mode}.out{j}_{name}"
        ref_stats = io[f"{key}.stats_f64"]
        scale = max(abs(ref_stats[3].item()), abs(ref_stats[4].item()))
        c, hh, ww = t.shape[1:]
        sub = t[:, :: c // 8, :: hh // 8, :: ww // 8]
        checks.append(_rel_out(f"native/{key}.sub", sub, io[f"{key}.sub"], scale))
        # [sum, sum x², sum |x|] within STATS_TOL relative (sum against sum |x|, which cannot
        # cancel); [max, min] within the outputs' tolerance.
        r = ref_stats
        out_tol = OUT_TOL * scale
        tol = torch.tensor([r[2], r[1], r[2], 0.0, 0.0], dtype=torch.float64) * STATS_TOL
        tol += torch.tensor([0.0, 0.0, 0.0, out_tol, out_tol], dtype=torch.float64)
        err = (_stats(t) - r).abs() / tol.clamp_min(1e-30)
        worst = err.max().item()
        checks.append(GoldenCheck(f"native/{key}.stats_f64 (err/tol)", worst, 1.0, worst <= 1.0))
    return checks


def check_native(golden_dir: Path, state: dict[str, Tensor]) -> list[GoldenCheck]:
    """``pdd_decoder_native_io.safetensors``: 256 px outputs (strided samples + stats), maps."""
    io = _open(golden_dir / "pdd_decoder_native_io.safetensors")
    res, vm = _inputs(io, "input_q", 32.0)
    size = res[0].shape[-1] * 4
    head = _build_head(state, None).train()  # run-time prior sizes = the reference's (16, 32)
    out = head(res, vm)
    checks = _native_output_checks("train", out, io)
    checks += [c._replace(name=f"native/{c.name}") for c in _loss_checks("train", out, io)]
    head = _build_head(state, None).eval()
    with torch.no_grad():
        out = head(res, vm)
        checks += _native_output_checks("eval", out, io)
        checks += [c._replace(name=f"native/{c.name}") for c in _loss_checks("eval", out, io)]
        checks += _map_checks("native", out, io, size)
        checks += _anomaly_output_check("native", out, io, size)
    return checks


def check_lossunit(golden_dir: Path) -> list[GoldenCheck]:
    """``lossunit.*``: every loss part on crafted features where all diversity branches act."""
    io = _open(golden_dir / "pdd_decoder_io.safetensors")

    def group(tag: str) -> list[Tensor]:
        return [io[f"lossunit.{tag}.{i}"] for i in range(3)]

    out = HeadOutput(
        targets=group("outputs3_6"), student1=group("outputs6_9"), student2=group("outputs0_3")
    )
    parts = pdd_loss(out)
    cos = torch.stack(
        [flat_cosine(a, b) for a, b in zip(out.student2, out.student1, strict=True)]
    )  # (3, B)
    pairs = {
        "MSE_loss_0_3__3_6": parts.mse_s2_t,
        "CosineLoss_0_3__3_6": parts.cos_s2_t,
        "MSE_loss_3_6__6_9": parts.mse_t_s1,
        "DiversityLoss": parts.diversity,
        "total": parts.total,
    }
    checks = [_loss(f"lossunit/{k}", v, io[f"lossunit.{k}"]) for k, v in pairs.items()]
    ref_cos = io["lossunit.cos_sim_outputs0_3_vs_outputs6_9"]
    checks.append(_abs("lossunit/cos_sim_outputs0_3_vs_outputs6_9", cos, ref_cos, LOSS_TOL))
    return checks


def check_decoder(golden_dir: Path | str) -> list[GoldenCheck]:
    """Reproduce every ``pdd_decoder_*`` fixture item; one GoldenCheck per item.

    Runs on CPU with one thread (the fixtures' setting) and restores the thread count.
    """
    golden_dir = Path(golden_dir)
    state = load_decoder_state(golden_dir / "pdd_decoder_state.safetensors")
    with _one_thread():
        checks = check_keys(golden_dir)
        checks += check_lossunit(golden_dir)
        checks += check_reduced(golden_dir, state)
        checks += check_native(golden_dir, state)
    n_bad = sum(not c.passed for c in checks)
    log.info("pdd_decoder golden: %d checks, %d failed", len(checks), n_bad)
    return checks
