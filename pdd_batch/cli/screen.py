"""`pdd-batch screen ARCHIVE`: distributed screening on Ray with a live view and a summary."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pdd_batch.cli.options import (
    FollowLinksOption,
    MaxFramesOption,
    MaxMemberOption,
    MaxRatioOption,
    MaxVoxelsOption,
    ModelsOption,
    TeacherWeightsOption,
)
from pdd_batch.cli.pacs import (
    AllOption,
    AllowInsecureHttpOption,
    LookbackDaysOption,
    MaxInstanceBytesOption,
    MaxSeriesBytesOption,
    ModalityOption,
    NetrcOption,
    PacsKindOption,
    PacsTimeoutOption,
    SinceOption,
    StudyUidFileOption,
    screen_from_pacs,
)
from pdd_batch.ingest.dicomweb_retrieve import DEFAULT_MAX_INSTANCE_BYTES, DEFAULT_MAX_SERIES_BYTES
from pdd_batch.runs.config import RunConfig

SAMPLE_FOLDER = "_sample_archive"  # inside OUT: readers skip "_" folders
EXIT_LOCKED = 3  # another run holds the folder (same code as jobs.nightly)

STAGES = {
    "discover": "discover files",
    "series": "read series",
    "slices": "score slices",
    "commit": "commit series",
}


class LiveView:
    """Progress per stage (rich), fed by ``jobs.screen`` progress events."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<15}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.tasks = {k: self.progress.add_task(v, total=None, note="") for k, v in STAGES.items()}

    def __call__(self, event: Any) -> None:
        """Apply one ``jobs.screen.ProgressEvent`` (not imported here: jobs loads Ray)."""
        if event.stage == "warning":  # e.g. what a --force run will replace
            self.progress.console.print(f"[yellow]warning:[/] {event.note}")
            return
        task = self.tasks.get(event.stage)
        if task is None:
            return
        note = event.note
        if event.rate is not None:
            note = f"{event.rate:.1f} slices/s"
        self.progress.update(task, completed=event.done, total=event.total, note=note)


CrosswalkOption = Annotated[
    Path | None,
    typer.Option(
        help="Also write file/series/study keys -> relative paths and original UIDs to this "
        "JSON file (mode 0600, outside --out): how a site finds the file behind a key."
    ),
]


MinAssessedOption = Annotated[
    float,
    typer.Option(
        "--min-assessed",
        min=0.0,
        max=1.0,
        help="Share of a study's slices that must be within the model's in-distribution check "
        "for the study to be called normal; else it is not_assessed (kept in the manifest).",
    ),
]


def _site_key_id(console: Console, crosswalk: Path | None, out: Path) -> str:
    """The site key's id, once the key file is trusted and the crosswalk lies outside the run
    folder; else the reason and exit 2."""
    from pdd_batch.ingest.keys import SiteKeyError, site_key
    from pdd_batch.runs.crosswalk import CrosswalkError, check_location

    try:
        key_id = site_key().key_id
        if crosswalk is not None:
            check_location(crosswalk, out)
    except (SiteKeyError, CrosswalkError) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from exc
    return key_id


def screen_command(
    archive: Annotated[
        str | None,
        typer.Argument(help="Folder (or .zip/.tar) to screen, or dicomweb+http(s)://HOST/ROOT."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder for the results.")] = Path(
        "screen-out"
    ),
    model: ModelsOption = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster to join (else RAY_ADDRESS, else local).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Rescreen everything, replacing results.")] = False,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Slices per model call.")] = None,
    num_actors: Annotated[int | None, typer.Option(min=1, help="Model actors.")] = None,
    num_cpus: Annotated[int | None, typer.Option(min=1, help="CPUs of a local cluster.")] = None,
    open_archives: Annotated[bool, typer.Option(help="Look inside .zip/.tar files.")] = False,
    precision: Annotated[
        str, typer.Option(help="Model arithmetic: fp32, or bf16 (faster on GPUs).")
    ] = "fp32",
    sample: Annotated[bool, typer.Option(help="Screen the bundled sample archive.")] = False,
    min_assessed: MinAssessedOption = RunConfig.min_assessed,
    teacher_weights: TeacherWeightsOption = None,
    follow_links_outside: FollowLinksOption = False,
    max_series_voxels: MaxVoxelsOption = RunConfig.max_series_voxels,
    max_frames_per_file: MaxFramesOption = RunConfig.max_frames_per_file,
    max_member_bytes: MaxMemberOption = RunConfig.max_member_bytes,
    max_compression_ratio: MaxRatioOption = RunConfig.max_compression_ratio,
    crosswalk: CrosswalkOption = None,
    since: SinceOption = None,
    modality: ModalityOption = None,
    study_uid_file: StudyUidFileOption = None,
    netrc: NetrcOption = None,
    fetch_all: AllOption = False,
    allow_insecure_http: AllowInsecureHttpOption = False,
    pacs_timeout: PacsTimeoutOption = 60.0,
    pacs_kind: PacsKindOption = "auto",
    lookback_days: LookbackDaysOption = None,
    max_instance_bytes: MaxInstanceBytesOption = DEFAULT_MAX_INSTANCE_BYTES,
    max_series_bytes: MaxSeriesBytesOption = DEFAULT_MAX_SERIES_BYTES,
) -> None:
    """Screen an archive: per-slice scores and heatmaps to Parquet, flagged studies summarised."""
    from pdd_batch.cli.summary_view import render_summary
    from pdd_batch.ingest.dicomweb import PACS_FOLDER, SERIES_FOLDER, is_dicomweb_source
    from pdd_batch.runs.config import RunConfigError, parse_teacher_weights

    console = Console(stderr=False)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _refuse_bare_url(console, archive)
    archive = _archive_or_exit(console, archive, sample, out)
    pacs = is_dicomweb_source(archive)
    pacs_options: dict[str, Any] = {"since": since, "modality": modality, "netrc": netrc}
    pacs_options["study_uid_file"] = study_uid_file
    pacs_options["lookback_days"] = lookback_days
    switches = {"all": fetch_all, "allow_insecure_http": allow_insecure_http}
    switches["pacs_kind"] = pacs_kind != "auto"
    if not pacs and (any(v is not None for v in pacs_options.values()) or any(switches.values())):
        console.print(
            "[red]--since, --modality, --study-uid-file, --netrc, --all, --allow-insecure-http, "
            "--pacs-kind, --lookback-days: dicomweb+ sources[/]"
        )
        raise typer.Exit(code=2)
    if lookback_days is not None and since != "last-run":
        console.print("[red]--lookback-days applies to --since last-run[/]")
        raise typer.Exit(code=2)
    switches["pacs_kind"] = pacs_kind
    pacs_options.update(switches, max_instance_bytes=max_instance_bytes, pacs_timeout=pacs_timeout)
    pacs_options["max_series_bytes"] = max_series_bytes
    try:
        cfg = RunConfig(
            archive=out / PACS_FOLDER / SERIES_FOLDER if pacs else Path(archive),
            out_dir=out,
            model_path=model[0] if model else None,
            more_models=tuple(model[1:]) if model else (),
            address=address,
            force=force,
            batch_size=batch_size,
            num_actors=num_actors,
            num_cpus=num_cpus,
            open_archives=open_archives,
            precision=precision,
            teacher_weights=parse_teacher_weights(teacher_weights or []),
            follow_links_outside=follow_links_outside,
            max_series_voxels=max_series_voxels,
            max_frames_per_file=max_frames_per_file,
            max_member_bytes=max_member_bytes,
            max_compression_ratio=max_compression_ratio,
            min_assessed=min_assessed,
        )
    except RunConfigError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from exc
    key_id = _site_key_id(console, crosswalk, out)
    pacs_options["crosswalk"] = crosswalk
    _warn_auth_override(console, cfg.resolved_address)
    result = _run_or_exit(console, cfg, archive if pacs else None, pacs_options)
    written = f"; crosswalk (keep private) written to {crosswalk}" if crosswalk else ""
    console.print(f"keys made with site key {key_id}{written}")
    code = render_summary(console, out)
    raise typer.Exit(code=max(code, result.exit_code))


def _refuse_bare_url(console: Console, archive: str | None) -> None:
    """``http(s)://...`` is not a folder: say how a PACS source is written (exit 2) before
    anything is made."""
    text = (archive or "").strip()
    if text.lower().startswith(("http://", "https://")):
        scheme = text.split(":", 1)[0].lower()
        console.print(
            f"[red]a PACS source is written dicomweb+{scheme}://HOST[:PORT]/ROOT "
            f"(e.g. dicomweb+{scheme}://pacs.example.org/dicom-web); a URL is not a folder[/]"
        )
        raise typer.Exit(code=2)


def _warn_auth_override(console: Console, address: str | None) -> None:
    """One console line when a local cluster will override the environment's Ray auth mode."""
    from jobs.cluster import override_auth_mode_for_local

    note = override_auth_mode_for_local(address)
    if note:
        console.print(f"[yellow]warning:[/] {note}", soft_wrap=True)


def _archive_or_exit(console: Console, archive: str | None, sample: bool, out: Path) -> str:
    """What to screen: ARCHIVE, or the bundled sample built into the run folder; exit 2 if
    neither was given."""
    if sample:
        from pdd_batch.ingest.sample import build_sample_archive

        archive = str(build_sample_archive(out / SAMPLE_FOLDER))
        console.print(f"sample archive built in {archive}")
    if archive is None:
        console.print("[red]give an ARCHIVE to screen, or --sample[/]")
        raise typer.Exit(code=2)
    return archive


def _run_or_exit(
    console: Console, cfg: RunConfig, pacs_url: str | None, pacs_options: dict[str, Any]
) -> Any:
    """Run the screen (from a folder, or from the PACS at ``pacs_url``) under the live view;
    a locked folder, an unusable PACS or a failed run is one clear line and an exit code."""
    from jobs.screen import run_screen
    from pdd_batch.cli.summary_view import render_summary
    from pdd_batch.ingest.dicomweb import DicomwebError
    from pdd_batch.runs.state import RunLockedError

    view = LiveView(console)
    try:
        if pacs_url is not None:
            return screen_from_pacs(console, pacs_url, cfg, pacs_options, view)
        with view.progress:
            return run_screen(cfg, progress=view, crosswalk=pacs_options["crosswalk"])
    except RunLockedError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=EXIT_LOCKED) from exc
    except DicomwebError as exc:  # the PACS cannot be used: one line, no URL path or UID
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from None
    except Exception as exc:  # the run failed: say why, show what was committed, exit 2
        from jobs.read_task import failure_reason  # UIDs masked, one line, bounded

        console.print(f"[red]screening run failed: {failure_reason(exc)}[/]")
        logging.getLogger(__name__).debug("run failed", exc_info=True)
        if (cfg.out_dir / "manifest.json").is_file():
            render_summary(console, cfg.out_dir)
        raise typer.Exit(code=2) from exc
