"""A self-contained HTML report of a screening run (``pdd-batch report``).

One file, no network assets: inline CSS, thumbnails as ``data:`` PNG URIs, inline SVG charts.
It shows the run summary, flagged studies ranked by score, the top slices with heatmap
overlays, score distributions, errors by reason and the model card. Only keyed digests
appear, never a path: the source images under the heatmaps are found through a
``SourceLocator`` (the screened archive or the screening crosswalk); without one the heatmaps are
drawn alone.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import logging
import re
from collections import Counter
from pathlib import Path
from string import Template

import numpy as np
import pyarrow.compute as pc

import pdd_batch
from pdd_batch.review.overlay import SourceLocator, display_scale, model_input_slices, overlay_png
from pdd_batch.review.site_note import threshold_warning_html
from pdd_batch.runs.results import RunResults
from pdd_batch.runs.writer import write_bytes_atomic

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("report_template.html")
MODEL_CARD_NAMES = ("model_card.md", "MODEL_CARD.md", "docs/model_card.md")
MAX_TABLE_ROWS = 100
INPUT_KEYS = ("inputs_seen", "inputs_scored", "inputs_skipped", "inputs_failed")


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _cards(results: RunResults) -> str:
    c = results.counts()
    items = [
        ("studies", c["studies"]),
        ("flagged studies", c["flagged_studies"]),
        ("series", c["series"]),
        ("slices", c["slices"]),
        ("flagged slices", c["flagged_slices"]),
        ("errors", c["errors"]),
    ]
    total = (results.manifest.get("timings") or {}).get("total_s")
    rate = results.manifest.get("slices_per_s")
    if isinstance(total, int | float):
        items.append(("seconds", f"{total:.1f}"))
    if isinstance(rate, int | float):
        items.append(("slices / s", f"{rate:.3g}"))
    return "".join(
        f'<div class="card"><div class="n">{n}</div><div class="l">{_e(label)}</div></div>'
        for label, n in items
    )


def _accounting(manifest: dict) -> tuple[str, str]:
    vals = [manifest.get(k) for k in INPUT_KEYS]
    if not all(isinstance(v, int) for v in vals):
        return "bad", "Input accounting unavailable (the manifest has no input counts)."
    seen, scored, skipped, failed = vals
    text = f"Inputs: seen {seen} = scored {scored} + skipped {skipped} + failed {failed}"
    if seen == scored + skipped + failed:
        return "ok", text + " - every input accounted for."
    return "bad", text + f" - {seen - scored - skipped - failed} unaccounted for."


def _studies_table(results: RunResults) -> tuple[str, str]:
    rows = results.flagged_studies()
    title = "Flagged studies, ranked by score"
    if rows.num_rows == 0:
        rows, title = results.ranked_studies(), "No study flagged - studies ranked by score"
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "#",
            "study",
            "modality",
            "max score",
            "top-k mean",
            "flagged / slices",
            "decision",
        )  # fmt: skip
    )
    body = []
    for i, r in enumerate(rows.slice(0, MAX_TABLE_ROWS).to_pylist(), start=1):
        body.append(
            f'<tr><td class="num">{i}</td><td class="key">{_e(r["study_key"])}</td>'
            f"<td>{_e(r.get('modality') or '-')}</td>"
            f'<td class="num">{r["max_score"]:.4g}</td><td class="num">{r["topk_mean"]:.4g}</td>'
            f'<td class="num">{r["n_flagged"]} / {r["n_slices"]}</td>'
            f'<td><span class="badge {_e(r["decision"])}">{_e(r["decision"])}</span></td></tr>'
        )
    more = rows.num_rows - MAX_TABLE_ROWS
    note = f'<p class="note">... and {more} more</p>' if more > 0 else ""
    table = f'<table id="studies-table"><tr>{head}</tr>{"".join(body)}</table>{note}'
    return title, table


def _thumbnails(
    results: RunResults, n: int, locator: SourceLocator | None
) -> tuple[str, tuple[float, float]]:
    """``<figure>`` elements for the top slice of the top ``n`` studies, and the colour scale
    (over the source slice when ``locator`` finds its file, else the heatmap alone)."""
    studies = results.flagged_studies()
    if studies.num_rows == 0:
        studies = results.ranked_studies()
    chosen = [results.top_slices(k, 1).to_pylist() for k in studies.column("study_key").to_pylist()]
    chosen = [rows[0] for rows in chosen[:n] if rows and rows[0]["heatmap_png"]]
    scale = display_scale(chosen)
    figures = []
    for rank, r in enumerate(chosen, start=1):
        base = None
        if locator is not None and locator.root.is_dir():
            mask = pc.equal(results.slices.column("series_key"), r["series_key"])
            series = locator.attach(results.slices.filter(mask).to_pylist())
            key = (r["volume_index"], r["slice_index"])
            base = model_input_slices(locator.root, series, {key}).get(key)
        if base is None:
            base = np.zeros((1, 1), dtype=np.float32)
        png = overlay_png(base, r["heatmap_png"], r["heatmap_max"], scale)
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        figures.append(
            f'<figure><img class="thumb" alt="study {rank} top slice" src="{uri}">'
            f'<figcaption>#{rank} <span class="key">{_e(r["study_key"])}</span><br>'
            f"slice {r['slice_index']} &middot; score {r['score']:.4g}</figcaption></figure>"
        )
    if not figures:
        figures.append('<p class="note">No slices with heatmaps in this run.</p>')
    return "".join(figures), scale


def _svg_decorations(groups, value_range, threshold, peak, box) -> list[str]:
    """Axis, tick labels, threshold line and legend of ``svg_histogram``."""
    lo, hi = value_range
    left, top, pw, ph, h = box
    parts = [f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" '
             'stroke="#57606a"/>']  # fmt: skip
    for frac in (0.0, 0.5, 1.0):
        x = left + frac * pw
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 14}" font-size="10" text-anchor="middle">'
                     f"{lo + frac * (hi - lo):.3g}</text>")  # fmt: skip
    parts.append(
        f'<text x="{left - 4}" y="{top + 8}" font-size="10" text-anchor="end">{peak}</text>'
    )
    if threshold is not None:
        x = left + pw * (threshold - lo) / (hi - lo)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#1d2733" '
                     f'stroke-dasharray="4,3"/><text x="{x + 3:.1f}" y="{top + 10}" font-size="10">'
                     f"threshold {threshold:.3g}</text>")  # fmt: skip
    for i, (label, (vals, colour)) in enumerate(groups.items()):
        x = left + 8 + i * 200
        parts.append(f'<rect x="{x}" y="{h - 12}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{x + 14}" y="{h - 3}" font-size="11">{_e(label)} ({len(vals)})'
                     "</text>")  # fmt: skip
    return parts


def svg_histogram(
    groups: dict[str, tuple[list[float], str]],
    title: str,
    threshold: float | None = None,
    bins: int = 30,
    size: tuple[int, int] = (460, 220),
) -> str:
    """An inline SVG stacked histogram.

    Args:
        groups: legend label -> (values, fill colour), stacked in order.
        title: chart title.
        threshold: draw a dashed vertical line at this value.
        bins: number of bins over the range of all values.
        size: (width, height) in px.
    """
    w, h = size
    left, right, top, bottom = 44, 10, 24, 34
    values = [v for vals, _ in groups.values() for v in vals]
    if not values:
        return (
            f'<svg width="{w}" height="{h}"><text x="10" y="20">{_e(title)}: no data</text></svg>'
        )
    lo, hi = min(values), max(values + ([threshold] if threshold is not None else []))
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = {k: np.histogram(v, bins=edges)[0] for k, (v, _) in groups.items()}
    peak = max(1, int(sum(counts.values()).max()))
    pw, ph = w - left - right, h - top - bottom
    bw = pw / bins
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">',
        f'<text x="{left}" y="15" font-size="13" font-weight="bold">{_e(title)}</text>',
    ]
    stack = np.zeros(bins)
    for label, (_, colour) in groups.items():
        for i, c in enumerate(counts[label]):
            if c:
                y = top + ph * (1 - (stack[i] + c) / peak)
                parts.append(
                    f'<rect x="{left + i * bw:.1f}" y="{y:.1f}" width="{max(bw - 1, 1):.1f}" '
                    f'height="{ph * c / peak:.1f}" fill="{colour}"/>'
                )
        stack += counts[label]
    parts += _svg_decorations(groups, (lo, hi), threshold, peak, (left, top, pw, ph, h))
    parts.append("</svg>")
    return "".join(parts)


def _charts(results: RunResults) -> str:
    s = results.slices
    scores = s.column("score").to_pylist()
    flagged = s.column("flagged").to_pylist()
    thr = [t for t in s.column("threshold").to_pylist() if t is not None]
    threshold = float(thr[0]) if thr else None
    slice_chart = svg_histogram(
        {
            "not flagged": ([v for v, f in zip(scores, flagged, strict=True) if not f], "#8fb3d9"),
            "flagged": ([v for v, f in zip(scores, flagged, strict=True) if f], "#e07b39"),
        },
        "Slice scores",
        threshold,
    )
    st = results.studies.to_pylist()
    study_chart = svg_histogram(
        {
            "normal / uncalibrated": ([r["max_score"] for r in st if r["decision"] != "flagged"],
                                      "#8fb3d9"),
            "flagged": ([r["max_score"] for r in st if r["decision"] == "flagged"], "#e07b39"),
        },
        "Study max scores",
        threshold,
    )  # fmt: skip
    return slice_chart + study_chart


def _errors_table(results: RunResults) -> str:
    if results.errors.num_rows == 0:
        return '<p class="ok">No errors: every input was used.</p>'
    groups = Counter(
        (r["stage"], r["status"], r["reason"][:120])
        for r in results.errors.select(["stage", "status", "reason"]).to_pylist()
    )
    rows = "".join(
        f"<tr><td>{_e(a)}</td><td>{_e(b)}</td><td>{_e(c)}</td><td class='num'>{n}</td></tr>"
        for (a, b, c), n in groups.most_common(20)
    )
    return (
        f"<table><tr><th>stage</th><th>status</th><th>reason</th><th>files</th></tr>{rows}</table>"
    )


def markdown_to_html(text: str) -> str:
    """A small Markdown subset (headings, lists, paragraphs, code, bold) as escaped HTML."""
    out, para, in_list, in_code = [], [], False, False

    def inline(s: str) -> str:
        s = _e(s)
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)

    def flush() -> None:
        nonlocal in_list
        if para:
            out.append(f"<p>{inline(' '.join(para))}</p>")
            para.clear()
        if in_list:
            out.append("</ul>")
            in_list = False

    for line in text.splitlines():
        if line.strip().startswith("```"):
            flush()
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
        elif in_code:
            out.append(_e(line))
        elif m := re.match(r"^(#{1,6})\s+(.*)", line):
            flush()
            level = min(len(m.group(1)) + 2, 6)
            out.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
        elif m := re.match(r"^\s*[-*]\s+(.*)", line):
            if para:
                out.append(f"<p>{inline(' '.join(para))}</p>")
                para.clear()
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{inline(m.group(1))}</li>")
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
    flush()
    if in_code:
        out.append("</pre>")
    return "\n".join(out)


def find_model_card(model_dir: Path | None) -> str | None:
    """Model card Markdown from a checkpoint folder (or a ``docs/`` up to two levels above)."""
    if model_dir is None or not model_dir.is_dir():
        return None
    for folder in (model_dir, model_dir.parent, model_dir.parent.parent):
        for name in MODEL_CARD_NAMES:
            if (folder / name).is_file():
                return (folder / name).read_text(encoding="utf-8", errors="replace")
    cfg = model_dir / "config.json"
    if cfg.is_file():
        try:
            card = json.loads(cfg.read_text(encoding="utf-8")).get("model_card")
        except (OSError, json.JSONDecodeError):
            return None
        return card if isinstance(card, str) and card.strip() else None
    return None


def _model_section(results: RunResults, model_dir: Path | None) -> str:
    facts = [
        ("model id", results.model_id or "-"),
        ("checkpoint hash", results.checkpoint_hash or "-"),
    ]
    thr = results.manifest.get("threshold")
    if thr is None and results.slices.num_rows:
        thr = next(
            (t for t in results.slices.column("threshold").to_pylist() if t is not None), None
        )
    facts.append(("threshold", "uncalibrated" if thr is None else f"{float(thr):.6g}"))
    table = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in facts)
    card = find_model_card(model_dir)
    body = (
        markdown_to_html(card)
        if card
        else '<p class="note">No model card found with the checkpoint; model id and hash above.</p>'
    )
    return f'<table id="model-facts">{table}</table>{body}'


def build_report(
    results: RunResults,
    model_dir: Path | None = None,
    thumbnails: int = 12,
    locator: SourceLocator | None = None,
) -> str:
    """The report HTML of a run.

    Args:
        results: the opened run.
        model_dir: checkpoint folder for the model card (None: id and hash only).
        thumbnails: number of studies whose top slice is shown with its heatmap.
        locator: finds the source files under the heatmaps (None: a 1.0 run's recorded
            archive root, else heatmaps alone).
    """
    if locator is None and results.archive_root is not None:
        locator = SourceLocator.for_run(results)  # 1.0: files named by path under the root
    accounted_class, accounted_text = _accounting(results.manifest)
    title, table = _studies_table(results)
    thumbs, scale = _thumbnails(results, thumbnails, locator)
    return Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        run_id=_e(results.manifest.get("run_id", "-")),
        status=_e(results.status),
        model_id=_e(results.model_id or "-"),
        checkpoint_short=_e((results.checkpoint_hash or "-")[:16]),
        generated=_e(dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        cards=_cards(results),
        accounted_class=accounted_class,
        accounted_text=_e(accounted_text),
        site_calibration=threshold_warning_html(results.manifest),
        thumbnails=thumbs,
        vmin=f"{scale[0]:.3g}",
        vmax=f"{scale[1]:.3g}",
        studies_title=_e(title),
        studies_table=table,
        charts=_charts(results),
        errors_table=_errors_table(results),
        model_card=_model_section(results, model_dir),
        version=_e(pdd_batch.__version__),
    )


def write_report(
    results: RunResults,
    out: Path,
    model_dir: Path | None = None,
    locator: SourceLocator | None = None,
) -> Path:
    """Write the report HTML to ``out`` (parents created); returns the path."""
    html_text = build_report(results, model_dir, locator=locator)
    write_bytes_atomic(html_text.encode("utf-8"), out)  # 0600, atomic
    log.info("report written (%d bytes)", out.stat().st_size)
    return out
