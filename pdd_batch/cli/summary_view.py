"""The rich summary of a screening run: the review queue (flagged, then not-assessed studies,
each ranked by score, with the outcome's reason), study outcomes, counts, accounting.

Shown at the end of ``pdd-batch screen`` and by ``pdd-batch summary``. Only hashed keys
(``study_key``) appear, never names, IDs, UIDs or dates. The exit status is the run's
(``exit_code_for``): it says whether the run finished with every input accounted for, not what
was found; study outcomes never change it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from pdd_batch.ingest.scope import OUT_OF_SCOPE_PREFIX, ModelScope
from pdd_batch.runs.results import RunResults, open_run

MAX_ROWS = 20
OK_STATUSES = ("complete", "completed", "done", "ok", "success", "succeeded", "finished")
INPUT_KEYS = ("inputs_seen", "inputs_scored", "inputs_skipped", "inputs_failed")


def inputs_accounted(manifest: dict) -> tuple[bool | None, str]:
    """Whether every input seen was scored, skipped or failed, and a one-line explanation.

    Returns ``(None, reason)`` when the manifest lacks the counts.
    """
    values = {k: manifest.get(k) for k in INPUT_KEYS}
    if not all(isinstance(v, int) for v in values.values()):
        return None, "manifest has no input counts"
    seen, scored, skipped, failed = (values[k] for k in INPUT_KEYS)
    text = f"seen {seen} = scored {scored} + skipped {skipped} + failed {failed}"
    if seen == scored + skipped + failed:
        return True, text
    missing = seen - scored - skipped - failed
    return False, f"{text} is off by {missing}"


def exit_code_for(results: RunResults) -> int:
    """The run's exit code: the manifest's ``exit_code`` when it has one, else 0 when the run
    finished and every input is accounted for, else 1 (never 0 when inputs are unaccounted for).
    """
    ok, _ = inputs_accounted(results.manifest)
    recorded = results.manifest.get("exit_code")
    if isinstance(recorded, int) and not isinstance(recorded, bool):
        return recorded if ok is not False else max(recorded, 1)
    finished = results.status.lower() in OK_STATUSES
    return 0 if ok and finished else 1


def counted(n: int, singular: str, plural: str | None = None) -> str:
    """``"1 study"``, ``"2 studies"``: ``n`` and the word in the form its number wants."""
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"


def _input_rows(results: RunResults) -> dict[str, int]:
    """Rows of the error table by what they are: failed inputs, inputs skipped as unusable
    (not images, duplicates, ...), and inputs outside every model's scope (skipped by design:
    not errors)."""
    rows = results.errors.select(["status", "reason"]).to_pylist()
    out_of_scope = sum(str(r["reason"]).startswith(OUT_OF_SCOPE_PREFIX) for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    return {
        "failed": failed,
        "skipped": len(rows) - failed - out_of_scope,
        "out_of_scope": out_of_scope,
    }


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


OUTCOME_STYLE = {"flagged": "red", "not_assessed": "yellow"}


def outcome_text(row: dict) -> str:
    """A study row's outcome with its reason (``not_assessed: 3/4 slices out of ...``)."""
    return f"{row['decision']}: {row['reason']}" if row.get("reason") else str(row["decision"])


def _studies_table(results: RunResults) -> Table:
    rows = results.review_queue()
    title = "Review queue: flagged, then not assessed studies, each ranked by score"
    if rows.num_rows == 0:
        rows = results.ranked_studies()
        title = "No study to review (none flagged or not assessed); highest-scoring studies"
    table = Table(title=title, show_lines=False, header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("study", no_wrap=True, min_width=16)  # hashed keys must stay whole
    for col, justify in (
        ("model", "left"),
        ("modality", "left"),
        ("max score", "right"),
        ("flagged / assessed / slices", "right"),
        ("outcome", "left"),
    ):
        table.add_column(col, justify=justify)
    for i, r in enumerate(rows.slice(0, MAX_ROWS).to_pylist(), start=1):
        assessed = "-" if r.get("n_assessed") is None else str(r["n_assessed"])
        table.add_row(
            str(i),
            r["study_key"],
            r["model_id"],
            r.get("modality") or "-",
            _fmt(r["max_score"]),
            f"{r['n_flagged']} / {assessed} / {r['n_slices']}",
            outcome_text(r),
            style=OUTCOME_STYLE.get(r["decision"]),
        )
    if rows.num_rows > MAX_ROWS:
        table.caption = f"... and {rows.num_rows - MAX_ROWS} more"
    return table


def _counts_table(results: RunResults) -> Table:
    c = results.counts()
    table = Table(title="Counts", show_header=False)
    table.add_column("what")
    table.add_column("n", justify="right")
    table.add_row("studies", str(c["studies"]))
    table.add_row("  flagged", str(c["flagged_studies"]))
    table.add_row("  not assessed", str(c["not_assessed_studies"]))
    table.add_row("  normal", str(c["normal_studies"]))
    table.add_row("series", str(c["series"]))
    table.add_row("slices", str(c["slices"]))
    table.add_row("flagged slices", str(c["flagged_slices"]))
    table.add_row("out-of-distribution slices (not assessed)", str(c["ood_slices"]))
    inputs = _input_rows(results)
    table.add_row("failed inputs (errors)", str(inputs["failed"]))
    table.add_row("skipped inputs (not usable)", str(inputs["skipped"]))
    if inputs["out_of_scope"]:
        table.add_row(
            "inputs outside every model's scope (not screened)", str(inputs["out_of_scope"])
        )
    share = (results.manifest.get("run_config") or {}).get("min_assessed")
    if isinstance(share, int | float):
        table.caption = f"normal: no slice flagged and at least {share:.0%} of slices assessed"
    return table


def _models_table(results: RunResults) -> Table | None:
    """One row per model of the run (``manifest["models"]``): its scope, what it screened."""
    models = results.manifest.get("models")
    if not isinstance(models, list) or not models:
        return None
    cols = results.slices.select(["model_id", "series_key", "flagged"]).to_pylist()
    studies = results.studies.select(["model_id", "decision"]).to_pylist()
    table = Table(title="Models (each series goes to the model whose scope matches it)")
    table.add_column("model", no_wrap=True)
    table.add_column("scope")
    for col in ("series", "slices", "flagged slices", "flagged studies", "not assessed"):
        table.add_column(col, justify="right")
    for entry in models:
        mid = entry.get("model_id")
        rows = [r for r in cols if r["model_id"] == mid]
        scope = ModelScope.from_dict(entry.get("scope"))
        short = " ".join("/".join(v) for v in (scope.modalities, scope.body_parts) if v)
        table.add_row(
            str(mid),
            short if scope.known else "[yellow]unknown: scores every series[/]",
            str(len({r["series_key"] for r in rows})),
            str(len(rows)),
            str(sum(bool(r["flagged"]) for r in rows)),
            str(sum(r["model_id"] == mid and r["decision"] == "flagged" for r in studies)),
            str(sum(r["model_id"] == mid and r["decision"] == "not_assessed" for r in studies)),
        )
    n_out = results.manifest.get("inputs_out_of_scope")
    if isinstance(n_out, int) and n_out:
        files = counted(n_out, "input file")
        table.caption = f"{files} outside every model's scope: skipped, not scored"
    return table


def _errors_table(results: RunResults) -> Table | None:
    if results.errors.num_rows == 0:
        return None
    groups = Counter(
        (r["stage"], r["status"], r["reason"][:80])
        for r in results.errors.select(["stage", "status", "reason"]).to_pylist()
    )
    table = Table(title="Errors and skipped inputs (by reason)", header_style="bold")
    for col in ("stage", "status", "reason", "files"):
        table.add_column(col, justify="right" if col == "files" else "left")
    for (stage, status, reason), n in groups.most_common(10):
        table.add_row(stage, status, reason, str(n))
    return table


def _throughput(manifest: dict) -> str | None:
    """``time: 27.3 s, 0.41 slices/s`` from the manifest (None when it has no timings)."""
    total = (manifest.get("timings") or {}).get("total_s")
    rate = manifest.get("slices_per_s")
    if not isinstance(total, int | float):
        return None
    text = f"time: {total:.1f} s"
    return text + (f", {rate:.3g} slices/s" if isinstance(rate, int | float) else "")


def harvest_line(pacs: dict[str, Any]) -> str:
    """One line on how the run chose its studies (the manifest's ``pacs`` section)."""
    kind = f"{pacs.get('server_kind')} server ({pacs.get('kind_from')})"
    counts = ""
    if pacs.get("cursor") not in (None, "none", "studydate-window"):
        counts = (
            f"; {pacs.get('studies_cursor', 0)} studies by the cursor, "
            f"{pacs.get('studies_both', 0)} of them in the window too"
        )
    return f"{kind}, cursor {pacs.get('cursor')}: {pacs.get('limits')}{counts}"


def _header(results: RunResults) -> Panel:
    m = results.manifest
    ckpt = results.checkpoint_hash or "-"
    lines = [
        f"run: {m.get('run_id', '-')}   status: {results.status}",
        f"model: {results.model_id or '-'}   checkpoint: {ckpt[:16]}",
    ]
    ok, text = inputs_accounted(m)
    mark = {True: "[green]all inputs accounted for[/]", False: "[red]inputs missing[/]"}
    lost = m.get("inputs_lost")
    if isinstance(lost, int) and lost:
        text += f"; {lost} lost (rerun to finish)"
    unfetched = m.get("series_not_fetched")
    if isinstance(unfetched, int) and unfetched:
        text += f"; {unfetched} series not fetched from the PACS (rerun to finish)"
        ok = False  # the PACS held more than the run saw: not "all inputs accounted for"
    lines.append(f"inputs: {mark.get(ok, '[yellow]unknown[/]')} ({text})")
    pacs = m.get("pacs")
    if isinstance(pacs, dict) and pacs.get("cursor"):
        lines.append(f"PACS: {escape(harvest_line(pacs))}")
    speed = _throughput(m)
    if speed:
        lines.append(speed)
    code = exit_code_for(results)
    lines.append(f"exit status: {'[green]0[/]' if code == 0 else f'[red]{code}[/]'}")
    return Panel("\n".join(lines), title="pdd-batch screening run", expand=False)


def _site_calibration_warning(console: Console, results: RunResults) -> None:
    """One line when a model's threshold was not set on this site's data."""
    from pdd_batch.review.site_note import threshold_warning

    text = threshold_warning(results.manifest)
    if text is not None:
        console.print(f"[yellow]warning:[/] {escape(text)}")


def render_summary(console: Console, run_dir: str | Path | RunResults) -> int:
    """Print the run summary and return the exit code it implies (see ``exit_code_for``).

    Args:
        console: the rich console to print to.
        run_dir: a run folder, or already-opened ``RunResults``.
    """
    results = run_dir if isinstance(run_dir, RunResults) else open_run(run_dir)
    console.print(_header(results))
    _site_calibration_warning(console, results)
    console.print(_counts_table(results))
    models = _models_table(results)
    if models is not None:
        console.print(models)
    console.print(_studies_table(results))
    errors = _errors_table(results)
    if errors is not None:
        console.print(errors)
    return exit_code_for(results)
