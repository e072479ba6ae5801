"""The in-distribution check: fitted on training features, stored with the checkpoint, applied
per slice (never flagged when beyond it), studies decided from in-distribution slices."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, set_ood
from model.config import get_config
from model.ood import fit_ood, pool_levels
from model.pdd import build_model
from pdd_batch.ingest.preprocess import PreprocessSpec
from pdd_batch.runs.outcome import study_rows
from pdd_batch.runs.sink import Provenance, _ood


def _cloud(n: int, d: int, centre: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return centre + torch.randn(n, d, generator=gen)  # (n, d)


def test_check_passes_training_like_features_and_stops_far_ones() -> None:
    train = _cloud(200, 16, 0.0, 0)
    check = fit_ood(train, quantile=0.99)
    near = check.distance(_cloud(50, 16, 0.0, 1))  # (50,)
    far = check.distance(_cloud(50, 16, 8.0, 2))
    assert (near <= check.threshold).float().mean() >= 0.9  # about the training quantile
    assert bool((far > check.threshold).all())
    assert check.threshold > 0  # leave-one-out: not zero on the training set itself
    with pytest.raises(ValueError, match="16"):
        check.distance(torch.zeros(2, 3))


def test_views_of_one_image_do_not_vouch_for_each_other() -> None:
    images = _cloud(40, 16, 0.0, 0)
    views = images.repeat_interleave(4, dim=0) + 0.01 * _cloud(160, 16, 0.0, 1)  # near copies
    alone = fit_ood(views)  # each view's nearest neighbours are its own copies
    grouped = fit_ood(views, groups=torch.arange(160) // 4)
    new = _cloud(50, 16, 0.0, 2)  # new images from the same distribution
    assert (alone.distance(new) > alone.threshold).float().mean() > 0.9
    assert (grouped.distance(new) <= grouped.threshold).float().mean() >= 0.8
    with pytest.raises(ValueError, match="groups"):
        fit_ood(views, groups=torch.zeros(160))


def test_pooled_features_match_the_teachers_levels() -> None:
    levels = [torch.ones(2, 3, 4, 4), 2 * torch.ones(2, 5, 2, 2)]
    pooled = pool_levels(levels)
    assert pooled.shape == (2, 8) and torch.equal(pooled[0], torch.tensor([1.0] * 3 + [2.0] * 5))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(replace(get_config("test"), image_size=64))


def test_check_is_stored_with_the_checkpoint_and_verified(tmp_path: Path) -> None:
    model = _model()
    x = torch.rand(6, 1, 64, 64)
    cnn, _ = model.teacher_features(x)
    check = fit_ood(pool_levels(cnn))
    spec = PreprocessSpec(image_size=64).to_dict()
    ck = save_checkpoint(model, tmp_path / "ck", preprocessing=spec, ood=check)
    loaded = load_checkpoint(ck)
    assert loaded.ood is not None and loaded.ood.threshold == pytest.approx(check.threshold)
    assert loaded.meta["ood"]["n_train"] == 6
    feats = pool_levels(loaded.model.teacher_features(x)[0])
    assert torch.allclose(loaded.ood.distance(feats), check.distance(feats))
    plain = save_checkpoint(model, tmp_path / "plain", preprocessing=spec)
    assert load_checkpoint(plain).ood is None  # old checkpoints: no check, scored as before
    set_ood(plain, check)  # added later: weights (so model_id) unchanged
    assert load_checkpoint(plain).model_id == load_checkpoint(ck).model_id
    (ck / "ood.safetensors").write_bytes(b"replaced")
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(ck)


def test_predictor_reports_distances_from_the_teachers_own_pass(tmp_path: Path) -> None:
    from jobs.predictor import SlicePredictor

    model = _model()
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.5, size=(1, 64, 64)).astype(np.float32)
    train = np.clip(base + rng.normal(0, 0.01, size=(24, 64, 64)), 0, 1).astype(np.float32)
    check = fit_ood(pool_levels(model.teacher_features(torch.from_numpy(train)[:, None])[0]))
    spec = PreprocessSpec(image_size=64).to_dict()
    ck = save_checkpoint(model, tmp_path / "ck", preprocessing=spec, ood=check)
    inside = np.clip(base + rng.normal(0, 0.01, size=(2, 64, 64)), 0, 1).astype(np.float32)
    outside = np.zeros((2, 64, 64), np.float32)
    outside[:, ::8] = 1.0  # stripes: nothing like the training images
    images = np.concatenate([inside, outside])
    batch = {"kind": np.array(["slice"] * 4), "image": images, "series_key": np.array(["s"] * 4)}
    out = SlicePredictor(str(ck))(batch)
    dist = out["ood_distance"]
    assert (dist[:2] <= check.threshold).all() and (dist[2:] > check.threshold).all()
    assert list(out["model_id"]) == [load_checkpoint(ck).model_id] * 4


def test_rows_beyond_the_check_are_not_flagged_and_studies_use_the_rest() -> None:
    batch = {"ood_distance": np.array([1.0, 9.0, np.nan], np.float32)}
    assert _ood(batch, 0, 5.0) == (1.0, False)
    assert _ood(batch, 1, 5.0) == (9.0, True)
    assert _ood(batch, 2, 5.0) == (None, None) and _ood(batch, 0, None) == (None, None)
    assert Provenance("m", "h", "{}", "r", "c", 1.0).ood_threshold is None

    def rows(study: str, ood: list[bool | None], flagged: list[bool]) -> list[dict]:
        return [
            {"study_key": study, "series_key": study, "slice_key": f"{study}:{i}",
             "score": 10.0 - i, "flagged": f, "threshold": 1.0, "modality": "CT",
             "model_id": "m", "checkpoint_hash": "h", "out_of_distribution": o}
            for i, (o, f) in enumerate(zip(ood, flagged, strict=True))
        ]  # fmt: skip

    table = pa.Table.from_pylist(
        rows("a", [True, True], [False, False])  # only unfamiliar slices
        + rows("b", [True, False], [False, False])  # half assessed (the default share): normal
        + rows("c", [True, False], [False, True])
        + rows("d", [None, None], [True, False])  # a model without a check: as before
    )
    got = {r["study_key"]: r["decision"] for r in study_rows(table, topk=2, run_id="r").to_pylist()}
    assert got == {"a": "not_assessed", "b": "normal", "c": "flagged", "d": "flagged"}


def test_recalibration_never_flags_out_of_distribution_rows(tmp_path: Path) -> None:
    """A changed threshold re-flags every row when the run publishes: out-of-distribution rows
    stay unflagged whatever their score."""
    import pyarrow.parquet as pq

    from pdd_batch.runs.schema import SLICES_SCHEMA
    from pdd_batch.runs.state import RunState, SeriesRecord
    from pdd_batch.runs.writer import rows_to_table, write_table_atomic

    state = RunState.load(tmp_path)
    state.bind_model("h1", "m", force=False)
    rows = [
        {"slice_key": f"s1:{i}", "study_key": "st1", "series_key": "s1", "volume_index": 0,
         "slice_index": i, "file_key": f"f{i}", "score": 5.0, "threshold": 9.0,
         "flagged": False, "heatmap_png": b"", "heatmap_max": 0.0, "model_id": "m",
         "checkpoint_hash": "h1", "preprocessing": "{}", "run_id": "r", "code_version": "0",
         "ood_distance": 0.0, "out_of_distribution": ood}
        for i, ood in enumerate([True, False])
    ]  # fmt: skip
    write_table_atomic(rows_to_table(rows, SLICES_SCHEMA), state.store_dir / "a.parquet")
    state.commit_part("a.parquet", {"s1": SeriesRecord("a.parquet", 2, "fp", "st1")})
    assert state.bind_threshold(1.0) == 2
    state.publish("r2")
    table = pq.read_table(state.published_path).sort_by("slice_index")
    assert table["flagged"].to_pylist() == [False, True]
