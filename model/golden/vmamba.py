"""Golden checks for the VMamba v0 teacher against the ``vmamba_*`` fixtures.

See ``shared/golden/FORMAT_vmamba.md``: the ordered key lists of the tiny model and the small
fixture, and the small fixture's features, logits and debug intermediates (max abs 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.golden.checks import GoldenCheck
from model.vmamba import VSSM, load_vmamba_checkpoint, vmamba_small_fixture, vmamba_tiny_v0

KEYS_FILE = "vmamba_tiny_v0_keys.json"
STATE_FILE = "vmamba_small_v0_state.safetensors"
IO_FILE = "vmamba_small_v0_io.safetensors"
TOLERANCE = 1e-5


def key_mismatches(model: VSSM, expected: list[dict]) -> int:
    """Entries of the ordered (key, shape, dtype) list that differ from ``model.state_dict()``."""
    got = [
        (k, list(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in model.state_dict().items()
    ]
    want = [(e["key"], list(e["shape"]), e["dtype"]) for e in expected]
    return sum(a != b for a, b in zip(got, want, strict=False)) + abs(len(got) - len(want))


def _check_keys(golden_dir: Path) -> list[GoldenCheck]:
    manifest = json.loads((golden_dir / KEYS_FILE).read_text())
    checks = []
    for name, builder, entry in (
        ("vmamba_tiny/keys", vmamba_tiny_v0, "vssm_classifier"),
        ("vmamba_small/keys", vmamba_small_fixture, "small_fixture_vssm_classifier"),
    ):
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = builder()
        bad = key_mismatches(model, manifest[entry])
        checks.append(GoldenCheck(name, float(bad), 0.0, bad == 0))
    return checks


def _max_abs(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.shape != ref.shape:
        return float("inf")
    return float((got.float() - ref.float()).abs().max())


def small_fixture_outputs(model: VSSM, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor the io fixture stores, computed by ``model`` (eval, no grad) from ``x``."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        h = model.patch_embed(x)  # (B, H, W, C) channel-last
        out["debug.patch_embed_out"] = h
        first_block = model.layers[0].blocks[0]
        out["debug.layers.0.blocks.0.op_out"] = first_block.op(first_block.norm(h))
        for i, layer in enumerate(model.layers):
            h = layer.blocks(h)
            out[f"debug.layers.{i}.blocks_out"] = h
            h = layer.downsample(h)
            out[f"feat{i}"] = h.permute(0, 3, 1, 2)  # (B, C, H, W)
        out["logits"] = model.classifier(h)
        feats = model.forward_features(x)
        logits = model(x)
    # The public entry points must agree with the step-by-step path.
    for i, f in enumerate(feats):
        out[f"forward_features[{i}]"] = f
    out["forward"] = logits
    return out


def check_vmamba(golden_dir: Path | str) -> list[GoldenCheck]:
    """Reproduce the VMamba key lists and the small fixture; one GoldenCheck per item."""
    golden_dir = Path(golden_dir)
    checks = _check_keys(golden_dir)
    model = load_vmamba_checkpoint(vmamba_small_fixture(), golden_dir / STATE_FILE).eval()
    io = load_file(str(golden_dir / IO_FILE))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixture was generated with one thread
    try:
        got = small_fixture_outputs(model, io["input"])
    finally:
        torch.set_num_threads(threads)
    for name, value in got.items():
        ref_name = name
        if name.startswith("forward_features["):
            ref_name = f"feat{name[len('forward_features[') : -1]}"
        elif name == "forward":
            ref_name = "logits"
        err = _max_abs(value, io[ref_name])
        checks.append(GoldenCheck(f"vmamba_small/{name}", err, TOLERANCE, err <= TOLERANCE))
    return checks
