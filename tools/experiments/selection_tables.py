"""Tables of ``tools.experiments.selection_study`` (issue 23 items 2 and 3).

Per split: every candidate's figure (the one ``train`` chose by) and test AUROC, the kept one.
Per source: Spearman rank correlation of figure and test AUROC over all candidates and splits
(pooled, and the mean within a split), for the five-family figure and for figures recomputed
from subsets of the same copies; the test AUROC selection keeps against always training one
candidate. Item 3: each PDD candidate minus RD4AD on test (paired bootstrap), beside the number
of training normals and their heterogeneity. Test figures are reported, never used to choose.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from pdd_batch.evaluation.synthetic import FAMILIES
from tools.experiments.benchmark import paired_difference as paired_test_difference

DEFAULTS = ("lite0", "lite0-d")  # train's default candidate now, and before this session
FAMILY_SETS = {  # figures recomputed from the same copies: which families help the ranking
    "all five (train's)": FAMILIES,
    "without intensity": ("bleed", "mass", "consolidation", "patch"),
    "bleed+mass+patch": ("bleed", "mass", "patch"),
    **{f: (f,) for f in FAMILIES},
}


def subset_scores(cand: dict[str, Any], families: Sequence[str]) -> tuple[list, list, list]:
    """(normal, lesion, source) scores of the copies of ``families`` only."""
    fs = cand["figure_scores"]
    codes = {FAMILIES.index(f) for f in families}
    keep = [i for i, c in enumerate(fs["family"]) if c in codes]
    return fs["normal"], [fs["lesion"][i] for i in keep], [fs["source"][i] for i in keep]


def subset_figure(cand: dict[str, Any], families: Sequence[str]) -> float:
    normal, lesion, _ = subset_scores(cand, families)
    y = np.r_[np.zeros(len(normal)), np.ones(len(lesion))]
    return float(roc_auc_score(y, np.r_[normal, lesion]))


def choose(cands: Sequence[dict[str, Any]], families: Sequence[str]) -> int:
    """``jobs.selection.choose`` (the highest figure replaces the default, the first, only when
    its paired difference's 95 % interval is above 0) on the figure of ``families``' copies."""
    from jobs.selection import choose as selection_choose

    figures = []
    for c in cands:
        normal, lesion, source = subset_scores(c, families)
        scores = {"normal": normal, "lesion": lesion, "source": source}
        figures.append({"auroc": subset_figure(c, families), "scores": scores})
    return selection_choose(figures)[1]


def kept_with_default(cands: Sequence[dict[str, Any]], families: Sequence[str],
                      default: str) -> dict[str, Any]:  # fmt: skip
    """The candidate ``choose`` keeps when ``default`` is the first (the default) candidate."""
    order = sorted(cands, key=lambda c: c["config"] != default)  # stable: the rest keep order
    return order[choose(order, families)]


def _split_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    names = [c["config"] for c in rows[0]["candidates"]]
    out = ["| split | train normals | heterogeneity | "
           + " | ".join(f"`{n}` figure / test" for n in names) + " | kept | kept − best test |",
           "|---|---|---|" + "---|" * len(names) + "---|---|"]  # fmt: skip
    for r in rows:
        cs = r["candidates"]
        best = max(c["test_auroc"] for c in cs)
        kept = next(c for c in cs if c["kept"])
        het = cs[0]["heterogeneity"]
        cells = [f"{c['figure']['auroc']:.3f} / {c['test_auroc']:.3f}" for c in cs]
        out.append(f"| {r['split']} | {r['n_train']} | {het:.2f} | " + " | ".join(cells)
                   + f" | `{kept['config']}` | {kept['test_auroc'] - best:+.3f} |")  # fmt: skip
    return out


def _rank_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    out = ["| figure | Spearman pooled (all candidates × splits) | mean Spearman within a split |"
           " selection's mean test AUROC, default " + " / ".join(f"`{d}`" for d in DEFAULTS)
           + " |", "|---|---|---|---|"]  # fmt: skip
    for label, fams in FAMILY_SETS.items():
        fig = [subset_figure(c, fams) for r in rows for c in r["candidates"]]
        test = [c["test_auroc"] for r in rows for c in r["candidates"]]
        within = [spearmanr([subset_figure(c, fams) for c in r["candidates"]],
                            [c["test_auroc"] for c in r["candidates"]]).statistic
                  for r in rows]  # fmt: skip
        kept = {d: np.mean([kept_with_default(r["candidates"], fams, d)["test_auroc"]
                            for r in rows]) for d in DEFAULTS}  # fmt: skip
        out.append(f"| {label} | {spearmanr(fig, test).statistic:+.2f} | "
                   f"{np.nanmean(within):+.2f} | "
                   + " / ".join(f"{kept[d]:.3f}" for d in DEFAULTS) + " |")  # fmt: skip
    names = [c["config"] for c in rows[0]["candidates"]]
    for i, n in enumerate(names):
        mean = np.mean([r["candidates"][i]["test_auroc"] for r in rows])
        out.append(f"| always `{n}` | | | {mean:.3f} |")
    best = np.mean([max(c["test_auroc"] for c in r["candidates"]) for r in rows])
    out.append(f"| best on test (oracle, not available to a site) | | | {best:.3f} |")
    return out


def _students_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Item 3: each PDD candidate − RD4AD on the same test images (paired bootstrap)."""
    out = ["| split | train normals | heterogeneity | PDD − RD4AD on test [95 % paired interval] |"
           " PDD − RD4AD figure |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        cs = r["candidates"]
        rd = next(c for c in cs if c["arch"] == "rd4ad")
        cells, figs = [], []
        for c in (c for c in cs if c["arch"] != "rd4ad"):
            d, lo, hi = paired_test_difference([{**c, "seed": 0}], [{**rd, "seed": 0}])
            cells.append(f"`{c['config']}` {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            figs.append(f"`{c['config']}` {c['figure']['auroc'] - rd['figure']['auroc']:+.3f}")
        out.append(f"| {r['split']} | {r['n_train']} | {cs[0]['heterogeneity']:.2f} | "
                   + "; ".join(cells) + " | " + "; ".join(figs) + " |")  # fmt: skip
    return out


def render(rows: Sequence[dict[str, Any]]) -> str:
    """Every table, per source."""
    text: list[str] = []
    for source in sorted({r["source"] for r in rows}):
        sub = [r for r in rows if r["source"] == source]
        text += [f"## {source} ({len(sub)} splits)", "", *_split_table(sub), "",
                 *_rank_table(sub), "", *_students_table(sub), ""]  # fmt: skip
    if len({r["source"] for r in rows}) > 1:
        text += ["## all sources", "", *_rank_table(rows), ""]
    return "\n".join(text)
