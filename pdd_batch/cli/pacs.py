"""`pdd-batch screen dicomweb+http(s)://...`: the PACS side of the screen command (query options,
credentials, one-line errors); the screening itself is ``jobs.dicomweb_fetch.screen_pacs``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pdd_batch.cli.summary_view import counted, harvest_line

SinceOption = Annotated[
    str | None,
    typer.Option(help="PACS source: studies dated from YYYY-MM-DD, or 'last-run' (nightly)."),
]
ModalityOption = Annotated[
    str | None, typer.Option(help="PACS source: only studies/series of this modality (e.g. CT).")
]
StudyUidFileOption = Annotated[
    Path | None,
    typer.Option(help="PACS source: only these studies (a file, one StudyInstanceUID a line)."),
]
NetrcOption = Annotated[
    Path | None,
    typer.Option(
        help="PACS: netrc file with the login (default ~/.netrc, or env vars); must be 0600."
    ),
]
AllOption = Annotated[
    bool,
    typer.Option(
        "--all",
        help="PACS source: fetch every study the query matches (a first --since last-run "
        "asks for this or --since DATE).",
    ),
]
AllowInsecureHttpOption = Annotated[
    bool,
    typer.Option(
        help="PACS: send the login over plain http:// to a host that is not this machine."
    ),
]
PacsKindOption = Annotated[
    str,
    typer.Option(
        help="PACS source: orthanc, dcm4chee, generic, or auto (probe the server): which "
        "received-time cursor --since last-run keeps (docs/pacs.md).",
    ),
]
LookbackDaysOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=3660,
        help="PACS source: --since last-run asks again for studies dated this many days "
        "before the previous run's query (default 7; 1 with an Orthanc or dcm4chee cursor).",
    ),
]
PacsTimeoutOption = Annotated[
    float,
    typer.Option(
        min=1.0,
        help="PACS: seconds to wait for a connection or an answer (a refused or unknown host "
        "fails at once).",
    ),
]
DEFAULT_PACS_TIMEOUT_S = 60.0
MaxInstanceBytesOption = Annotated[
    int,
    typer.Option(min=1, help="PACS source: refuse an instance (one WADO-RS part) over this."),
]
MaxSeriesBytesOption = Annotated[
    int,
    typer.Option(min=1, help="PACS source: refuse a series whose instances total over this."),
]


def first_last_run_refusal(found: Any) -> str:
    """The line that stops a first ``--since last-run`` (nothing recorded yet)."""
    return (
        f"no earlier run in this folder: --since last-run would fetch all {found.n_studies} "
        f"studies ({len(found.hits)} series) the query matches; give --since YYYY-MM-DD for "
        "the first run, or --all"
    )


def pacs_query(
    out: Path,
    since: str | None,
    modality: str | None,
    study_uid_file: Path | None,
    lookback_days: int = 1,
) -> tuple[Any, bool]:
    """The ``pdd_batch.dicomweb.Query`` of the options, and whether it is a first
    ``--since last-run`` (no earlier query recorded: it would ask for everything).

    Raises:
        DicomwebError: an unreadable --since or study UID file.
    """
    from pdd_batch.ingest.dicomweb import Query, parse_since, read_study_uid_file

    since_date, is_last_run = parse_since(since, out, lookback_days)
    uids = read_study_uid_file(study_uid_file) if study_uid_file else ()
    query = Query(since=since_date, modality=modality or None, study_uids=uids)
    return query, is_last_run and since_date is None


def find_series(endpoint: Any, out: Path, options: dict[str, Any]) -> tuple[Any, Any]:
    """The query of the options and what it found: the server's kind (``--pacs-kind``, probed
    when ``auto``), Orthanc's change-log cursor read first (nothing received meanwhile is
    missed), and for ``--since last-run`` the studies received since the previous run added
    to the StudyDate window (``pdd_batch.ingest.pacs_harvest``).

    Raises:
        DicomwebError: the PACS cannot be queried, or a first ``--since last-run`` without
            ``--all`` (the message says how many studies it would fetch).
    """
    from pdd_batch.ingest import pacs_harvest as ph
    from pdd_batch.ingest.dicomweb import DicomwebError, run_query
    from pdd_batch.ingest.orthanc_changes import change_cursor

    kind, how = ph.resolve_kind(endpoint, options.get("pacs_kind") or ph.AUTO)
    last_run = options.get("since") == "last-run"
    cursor = ph.cursor_kind(kind, out) if last_run else ph.CURSOR_NONE
    days = ph.lookback_days(cursor, options.get("lookback_days")) if last_run else None
    query, first_last_run = pacs_query(
        out,
        options.get("since"),
        options.get("modality"),
        options.get("study_uid_file"),
        days or 1,
    )
    change_last = change_cursor(endpoint) if kind == ph.ORTHANC else None  # before the query
    found = run_query(endpoint, query)  # before the live view: a refusal is one line
    if first_last_run and not options.get("all"):
        raise DicomwebError(first_last_run_refusal(found))  # exit 2, nothing fetched
    plan = ph.Harvest(kind, how, cursor, days)
    if last_run and not first_last_run:  # and what the PACS received since the last run
        return query, ph.add_received(endpoint, query, found, out, plan, change_last)
    plan = dataclasses.replace(plan, studies_window=found.n_studies)
    if first_last_run:  # --all: everything, no earlier run to reach back from
        plan = dataclasses.replace(plan, cursor=ph.CURSOR_NONE, lookback_days=None)
    return query, dataclasses.replace(found, cursor=change_last, harvest=plan)


def screen_from_pacs(
    console: Console,
    source: str,
    cfg: Any,
    options: dict[str, Any],
    view: Any,
) -> Any:
    """Query, fetch and screen (a PACS that cannot be used raises ``DicomwebError``).

    Args:
        console: where messages go.
        source: ``dicomweb+http(s)://HOST[:PORT]/ROOT``.
        cfg: the run's ``RunConfig`` (its archive is replaced by the run's series cache).
        options: ``since``, ``modality``, ``study_uid_file``, ``netrc``, ``crosswalk``, ``all``,
            ``allow_insecure_http``, ``pacs_timeout``, ``pacs_kind``, ``lookback_days``,
            ``max_instance_bytes``, ``max_series_bytes`` of the command line.
        view: the live progress view (a ``LiveView``).

    Returns:
        The ``jobs.screen.ScreenResult`` of the folder screen of the fetched series.
    """
    from jobs.dicomweb_fetch import screen_pacs
    from pdd_batch.ingest.dicomweb import endpoint_from_source
    from pdd_batch.ingest.dicomweb_retrieve import FetchLimits

    endpoint = endpoint_from_source(
        source, options.get("netrc"), bool(options.get("allow_insecure_http"))
    )
    timeout_s = options.get("pacs_timeout") or DEFAULT_PACS_TIMEOUT_S
    endpoint = dataclasses.replace(endpoint, timeout_s=float(timeout_s))
    query, found = find_series(endpoint, cfg.out_dir, options)
    own = f" ({found.own_skipped} of pdd-batch's own SR/KOS/overlay series left out)"
    console.print(
        f"PACS {endpoint.host}: {len(found.hits)} series found" + (own if found.own_skipped else "")
    )
    if found.harvest is not None:
        console.print(f"PACS {endpoint.host}: {harvest_line(found.harvest.to_dict())}")
    limits = FetchLimits(
        options.get("max_instance_bytes") or FetchLimits.max_instance_bytes,
        options.get("max_series_bytes") or FetchLimits.max_series_bytes,
    )
    with view.progress:
        result = screen_pacs(
            cfg,
            endpoint,
            query,
            progress=view,
            found=found,
            crosswalk=options.get("crosswalk"),
            limits=limits,
        )
    f = result.fetch
    console.print(
        f"PACS {endpoint.host}: {f.cached} series fetched by earlier runs, "
        f"{f.fetched} fetched ({f.instances} instances), {len(f.failed)} failed"
        + (" (the run is incomplete: rerun to fetch them)" if f.failed else "")
    )
    return result.screen


ExportToOption = typer.Option(
    "--to", help="Store an SR and key images into the original studies: dicomweb+http(s)://..."
)


def export_to_pacs_command(
    console: Console,
    results: Path,
    to: str,
    top: int | None,
    min_score: float | None,
    netrc: Path | None,
    secondary_capture: bool = False,
    allow_insecure_http: bool = False,
) -> None:
    """`pdd-batch export RUN --to dicomweb+...`: always ends with ``typer.Exit`` (0, 1: some
    studies failed, 2: the PACS or the run cannot be used)."""
    from pdd_batch.ingest.dicomweb import DicomwebError, endpoint_from_source
    from pdd_batch.review.pacs_export import export_to_pacs
    from pdd_batch.runs.results import ResultsError, open_run

    try:
        endpoint = endpoint_from_source(to, netrc, allow_insecure_http)
        summary = export_to_pacs(
            open_run(results),
            endpoint,
            top=top,
            min_score=min_score,
            secondary_capture=secondary_capture,
        )
    except (DicomwebError, ResultsError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(code=2) from None
    console.print(
        f"PACS {endpoint.host}: stored an SR and a key-object selection"
        + (" and heatmap overlays" if secondary_capture else "")
        + f" in {counted(len(summary.studies), 'study', 'studies')}"
        + (
            f"; [red]{counted(len(summary.errors), 'study', 'studies')} failed[/]"
            if summary.errors
            else ""
        )
    )
    for key, reason in sorted(summary.errors.items()):
        console.print(f"[yellow]study {key[:8]}:[/] {reason}")
    raise typer.Exit(code=1 if summary.errors else 0)
