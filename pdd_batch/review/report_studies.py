"""The report's study tables: the review queue with each study's outcome (``runs.outcome``) and
the model that scored it, and each study's out-of-distribution slices (never flagged, never
called normal). Only keyed digests appear."""

from __future__ import annotations

import html
from collections import defaultdict

import pyarrow.compute as pc

from pdd_batch.runs.results import RunResults

MAX_TABLE_ROWS = 100
MAX_LISTED_SLICES = 40  # slice indices listed per study and series


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def outcome_badge(row: dict) -> str:
    """The outcome as a coloured badge, with its reason after it."""
    decision = str(row["decision"])
    badge = f'<span class="badge {_e(decision)}">{_e(decision)}</span>'
    return badge + (f" {_e(row['reason'])}" if row.get("reason") else "")


def studies_table(results: RunResults) -> tuple[str, str]:
    """(title, HTML table) of the review queue (flagged, then not assessed), else of every
    study by score when the queue is empty."""
    rows = results.review_queue()
    title = "Review queue: flagged, then not assessed studies, each ranked by score"
    if rows.num_rows == 0:
        rows = results.ranked_studies()
        title = "No study to review (none flagged or not assessed) - studies ranked by score"
    heads = ("#", "study", "model", "modality", "max score", "flagged / assessed / slices")
    head = "".join(f"<th>{h}</th>" for h in (*heads, "outcome"))
    body = []
    for i, r in enumerate(rows.slice(0, MAX_TABLE_ROWS).to_pylist(), start=1):
        assessed = "-" if r.get("n_assessed") is None else r["n_assessed"]
        body.append(
            f'<tr><td class="num">{i}</td><td class="key">{_e(r["study_key"])}</td>'
            f"<td><code>{_e(r['model_id'])}</code></td>"
            f"<td>{_e(r.get('modality') or '-')}</td>"
            f'<td class="num">{r["max_score"]:.4g}</td>'
            f'<td class="num">{r["n_flagged"]} / {assessed} / {r["n_slices"]}</td>'
            f"<td>{outcome_badge(r)}</td></tr>"
        )
    more = rows.num_rows - MAX_TABLE_ROWS
    note = f'<p class="note">... and {more} more</p>' if more > 0 else ""
    return title, f'<table id="studies-table"><tr>{head}</tr>{"".join(body)}</table>{note}'


def _listed(indices: list[int]) -> str:
    shown = ", ".join(str(i) for i in sorted(indices)[:MAX_LISTED_SLICES])
    return shown + (" ..." if len(indices) > MAX_LISTED_SLICES else "")


def ood_table(results: RunResults) -> str:
    """Per study and model with out-of-distribution slices: how many of its slices, and
    which (slice index along each series, as in the slice table)."""
    s = results.slices
    if "out_of_distribution" not in s.column_names or s.num_rows == 0:
        return '<p class="note">No in-distribution check in this run: every slice assessed.</p>'
    ood = s.filter(pc.fill_null(s.column("out_of_distribution"), False))
    if ood.num_rows == 0:
        return '<p class="ok">No slice out of distribution: every slice was assessed.</p>'
    by_study: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for r in ood.select(["study_key", "model_id", "series_key", "slice_index"]).to_pylist():
        by_study[(r["study_key"], r["model_id"])][r["series_key"]].append(r["slice_index"])
    outcomes = {(r["study_key"], r["model_id"]): r for r in results.studies.to_pylist()}
    body = []
    for key in sorted(by_study, key=lambda k: -sum(len(v) for v in by_study[k].values())):
        row = outcomes.get(key, {"decision": "-", "n_slices": "-"})
        n = sum(len(v) for v in by_study[key].values())
        where = "<br>".join(
            f'<span class="key">{_e(series[:12])}</span>: {_listed(idx)}'
            for series, idx in sorted(by_study[key].items())
        )
        body.append(
            f'<tr><td class="key">{_e(key[0])}</td><td><code>{_e(key[1])}</code></td>'
            f'<td class="num">{n} / {row["n_slices"]}</td><td>{where}</td>'
            f"<td>{outcome_badge(row) if 'study_key' in row else '-'}</td></tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in ("study", "model", "out of distribution / slices", "slices", "outcome")
    )
    return f'<table id="ood-table"><tr>{head}</tr>{"".join(body[:MAX_TABLE_ROWS])}</table>'
