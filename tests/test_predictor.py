"""The scoring actor's class and the PNG stage, called directly (no Ray): what the pipeline's
two map stages do to a batch of slice and marker rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from screen_support import IMAGE_SIZE, make_checkpoint

from jobs.predictor import SlicePredictor, encode_heatmaps_fn
from model.checkpoint import load_checkpoint
from pdd_batch.runs.heatmap import decode_heatmap


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory):
    return make_checkpoint(tmp_path_factory.mktemp("pred") / "ckpt")


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.random((4, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)  # (N, S, S)
    images[2] = 0.0  # the marker row's placeholder image
    return {
        "kind": np.array(["slice", "slice", "end", "slice"], dtype=object),
        "slice_key": np.array(["a", "b", "", "c"], dtype=object),
        "image": images,
    }


def test_actor_scores_slices_and_the_png_stage_encodes_their_maps(ckpt) -> None:
    batch = _batch()
    scored = SlicePredictor(str(ckpt), device="cpu")(batch)
    assert "image" not in scored and scored["heatmap_u8"].shape == (4, IMAGE_SIZE, IMAGE_SIZE)
    out = encode_heatmaps_fn(scored)
    assert "heatmap_u8" not in out
    assert np.isnan(out["score"][2]) and out["heatmap_png"][2] == b""  # the marker row
    model = load_checkpoint(ckpt).model
    slices = torch.from_numpy(batch["image"][[0, 1, 3]]).unsqueeze(1)  # (3, 1, S, S)
    want = model.predict(slices)
    np.testing.assert_allclose(out["score"][[0, 1, 3]], want.scores.numpy(), rtol=1e-5)
    for j, i in enumerate((0, 1, 3)):
        amap = decode_heatmap(out["heatmap_png"][i], float(out["heatmap_max"][i]))
        step = float(out["heatmap_max"][i]) / 255
        np.testing.assert_allclose(amap, want.maps[j].numpy(), atol=step / 2 + 1e-6)


def test_bf16_actor_scores_close_to_fp32(ckpt) -> None:
    batch = _batch()
    full = SlicePredictor(str(ckpt), device="cpu")(dict(batch))["score"]
    low = SlicePredictor(str(ckpt), device="cpu", precision="bf16")(dict(batch))["score"]
    ok = ~np.isnan(full)
    np.testing.assert_allclose(low[ok], full[ok], rtol=2e-2)
    assert np.isnan(low[2])


def test_unknown_precision_is_refused_at_construction(ckpt) -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        SlicePredictor(str(ckpt), device="cpu", precision="int8")
