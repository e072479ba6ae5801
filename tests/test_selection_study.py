"""The selection study of issue 23 (tools/experiments/selection_study, selection_tables): the
splits it builds and the figures it recomputes from stored per-copy scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pdd_batch.evaluation.synthetic import FAMILIES, synthetic_figure
from tools.experiments.selection_study import headct_split
from tools.experiments.selection_tables import choose, kept_with_default, render, subset_figure


def _headct_like(root: Path) -> Path:
    """100 normal and 100 abnormal tiny PNGs and a split.csv with HeadCT's 60/10/30+100 rows."""
    rows = ["path,label,split"]
    for label, cls in ((0, "normal"), (1, "abnormal")):
        (root / cls).mkdir(parents=True)
        for i in range(100):
            Image.fromarray(np.full((8, 8), i, np.uint8)).save(root / f"{cls}/{i:03d}.png")
            split = "test" if label else ("train" if i < 60 else "val" if i < 70 else "test")
            rows.append(f"{cls}/{i:03d}.png,{label},{split}")
    (root / "split.csv").write_text("\n".join(rows) + "\n")
    return root


def test_a_redraw_keeps_the_fixed_sizes_and_never_gives_selection_a_test_image(
    tmp_path: Path,
) -> None:
    data = _headct_like(tmp_path / "h")
    fixed_items, _ = headct_split(data, None)
    draws = [headct_split(data, k) for k in (0, 1)]
    for items, test in draws:
        splits = [it.split for it in items]
        assert splits.count("train") == 60 and splits.count("val") == 10
        assert all(it.label == 0 for it in items)  # selection sees normals only
        assert len(test) == 130 and sum(it.label for it in test) == 100
        assert not {it.rel for it in items} & {it.rel for it in test}
    assert {it.rel for it in draws[0][1]} != {it.rel for it in draws[1][1]}  # other test normals
    again, _ = headct_split(data, 0)
    assert [it.rel for it in again] == [it.rel for it in draws[0][0]]  # seeded
    assert {it.split for it in fixed_items} == {"train", "val"}


def _candidate(name: str, arch: str, shift: float, rng: np.random.Generator) -> dict:
    """A candidate row whose lesioned copies score ``shift`` above the normals."""
    n = 20
    normal = rng.normal(0, 1, n)
    source = np.repeat(np.arange(n), len(FAMILIES))
    family = np.tile(np.arange(len(FAMILIES)), n)
    signal = shift * (family != FAMILIES.index("intensity"))  # intensity copies: no signal
    lesion = normal[source] + signal + rng.normal(0, 0.5, source.size)
    fig = synthetic_figure(normal, lesion, source, family)
    return {"config": name, "arch": arch, "figure": fig, "kept": name == "a",
            "figure_scores": {"normal": normal.tolist(), "lesion": lesion.tolist(),
                              "source": source.tolist(), "family": family.tolist()},
            "test_auroc": 0.9, "test_scores": list(rng.normal(0, 1, 10)),
            "test_labels": [0] * 5 + [1] * 5, "heterogeneity": 1.0, "n_train": 60}  # fmt: skip


def test_subset_figures_match_the_recorded_ones_and_choice_keeps_the_margin_rule() -> None:
    rng = np.random.default_rng(0)
    cands = [_candidate("a", "pdd", 0.2, rng), _candidate("b", "rd4ad", 3.0, rng)]
    for c in cands:
        assert np.isclose(subset_figure(c, FAMILIES), c["figure"]["auroc"])
        for f in FAMILIES:
            assert np.isclose(subset_figure(c, (f,)), c["figure"]["per_family"][f])
    assert choose(cands, FAMILIES) == 1  # clearly better: replaces the default
    assert choose(cands, ("intensity",)) == 0  # no lesion signal: the default is kept
    assert kept_with_default(cands, ("intensity",), "b")["config"] == "b"  # whichever is first
    assert kept_with_default(cands, FAMILIES, "b")["config"] == "b"
    row = {"split": "s", "source": "headct", "seed": 0, "n_train": 60, "candidates": cands}
    text = render([row, {**row, "split": "t"}])
    assert "| s | 60 |" in text and "always `b`" in text and "PDD − RD4AD" in text
