"""`pdd-batch calibrate DATA --model DIR --fpr 0.05`: threshold from normal images only.

DATA is an image folder or split CSV (the development set), or with ``--archive`` a site's normal
studies: a DICOM/NIfTI folder or ``dicomweb+...`` with ``--study-uid-file``, screened as `screen`
screens them, with a held-out share of studies that measures the threshold.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pdd_batch.cli.options import (
    AddressOption,
    FollowLinksOption,
    SplitFileOption,
    TeacherWeightsOption,
    load_items,
    teacher_weight_paths,
)
from pdd_batch.cli.pacs import NetrcOption, StudyUidFileOption
from pdd_batch.evaluation.site_calibration import DEFAULT_BOOTSTRAP, DEFAULT_HOLDOUT

ArchiveFlag = Annotated[
    bool,
    typer.Option(
        help="DATA is a site's normal studies (DICOM/NIfTI folder, or dicomweb+http(s)://... "
        "with --study-uid-file), read and scored exactly as `screen` does."
    ),
]
HoldoutOption = Annotated[
    float,
    typer.Option(
        min=0.0,
        max=0.95,
        help="With --archive: share of studies held out (by study, seeded) to measure the "
        "threshold's false-positive rate; 0: none.",
    ),
]


def calibrate_command(
    data: Annotated[
        str,
        typer.Argument(help="Image folder or split CSV of normals; with --archive: studies."),
    ],
    model: Annotated[Path, typer.Option(help="Checkpoint folder to calibrate (rewritten).")],
    fpr: Annotated[float, typer.Option(help="Target false-positive rate on normal slices.")] = 0.05,
    split_file: SplitFileOption = None,
    split: Annotated[
        str | None, typer.Option(help="Split to use (default: val with a split file).")
    ] = None,
    address: AddressOption = None,
    teacher_weights: TeacherWeightsOption = None,
    archive: ArchiveFlag = False,
    holdout: HoldoutOption = DEFAULT_HOLDOUT,
    seed: Annotated[int, typer.Option(help="With --archive: seeds the split.")] = 0,
    bootstrap: Annotated[
        int, typer.Option(min=100, help="With --archive: bootstrap draws of the intervals.")
    ] = DEFAULT_BOOTSTRAP,
    num_cpus: Annotated[int | None, typer.Option(min=1, help="CPUs of a local cluster.")] = None,
    study_uid_file: StudyUidFileOption = None,
    netrc: NetrcOption = None,
    follow_links_outside: FollowLinksOption = False,
) -> None:
    """Store the threshold that flags at most FPR of DATA's normal slices (score > threshold).

    With --archive the threshold is set on the site's own normal studies, and the held-out
    studies give the false-positive rate it achieves per study and per slice (95% intervals).
    """
    console = Console()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    moved = teacher_weight_paths(console, teacher_weights)
    if archive:
        opts = {"fpr": fpr, "holdout": holdout, "seed": seed, "n_boot": bootstrap,
                "address": address, "num_cpus": num_cpus, "teacher_weights": moved,
                "follow_links_outside": follow_links_outside}  # fmt: skip
        _calibrate_site(console, data, model, opts, study_uid_file, netrc)
        return
    if study_uid_file is not None or netrc is not None:
        console.print("[red]--study-uid-file and --netrc go with --archive dicomweb+...[/]")
        raise typer.Exit(code=2)
    _calibrate_images(console, Path(data), model, fpr, split_file, split, address, moved)


def _calibrate_images(
    console: Console, data: Path, model: Path, fpr: float, split_file: Path | None,
    split: str | None, address: str | None, moved: dict[str, str],
) -> None:  # fmt: skip
    """The development-set calibration: the normal images of an image folder or split CSV."""
    from rich.progress import Progress

    from jobs.evaluate import EvaluationError, run_calibration
    from model.checkpoint import CheckpointError
    from model.teachers import TeacherWeightsError
    from pdd_batch.evaluation.calibration import CalibrationError

    if split is None and (split_file is not None or data.suffix.lower() == ".csv"):
        split = "val"
    items, desc = load_items(console, data, split_file, split)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("scoring normals", total=sum(it.label == 0 for it in items))
        try:
            rec = run_calibration(
                items, model, fpr, split=split or "all",
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                address=address, data_description=desc, teacher_weights=moved,
            )  # fmt: skip
        except (EvaluationError, CalibrationError, CheckpointError, TeacherWeightsError) as exc:
            console.print(f"[red]calibration failed: {exc}[/]")
            raise typer.Exit(code=1) from exc
    console.print(
        f"threshold {rec['threshold']:.6g} at target FPR {rec['fpr']} from {rec['n_normals']} "
        f"normal images (observed FPR {rec['observed_fpr']:.3f}); flag rule: {rec['rule']}"
    )
    if rec["n_normals"] < 20:
        note = "the threshold is at or near the largest normal score; more normals steady it"
        console.print(f"[yellow]only {rec['n_normals']} normals: {note}[/]")
    console.print(
        "[yellow]threshold source: development set. Screening a site's own studies: "
        "calibrate on its normal studies with --archive.[/]"
    )
    console.print(f"stored in {Path(model) / 'config.json'}")


def _calibrate_site(
    console: Console, data: str, model: Path, opts: dict[str, Any],
    study_uid_file: Path | None, netrc: Path | None,
) -> None:  # fmt: skip
    """`calibrate --archive`: screen the site's normals, threshold, held-out rates, store."""
    from jobs.site_calibration import SiteOptions, calibrate_site
    from model.checkpoint import CheckpointError
    from model.teachers import TeacherWeightsError
    from pdd_batch.cli.screen import LiveView
    from pdd_batch.cli.site_source import archive_source, describe_source
    from pdd_batch.evaluation.calibration import CalibrationError
    from pdd_batch.ingest.dicomweb import DicomwebError

    source = archive_source(console, data, study_uid_file, netrc)
    view = LiveView(console)
    try:
        with view.progress:
            result = calibrate_site(source, model, SiteOptions(**opts), progress=view,
                                    data_description=describe_source(source))  # fmt: skip
    except (CalibrationError, CheckpointError, TeacherWeightsError, DicomwebError) as exc:
        console.print(f"[red]calibration failed: {exc}[/]")
        raise typer.Exit(code=1) from None
    _print_site(console, result.record, result.inputs)
    console.print(f"stored in {Path(model) / 'config.json'} (threshold source: site)")


def _print_site(console: Console, rec: dict[str, Any], inputs: dict[str, int]) -> None:
    """The site calibration in a few lines: inputs, threshold, held-out figures."""
    from pdd_batch.evaluation.site_calibration import heldout_line

    site = rec["site"]
    console.print(
        f"inputs: {inputs['inputs_seen']} seen, {inputs['inputs_scored']} scored, "
        f"{inputs['inputs_skipped']} skipped ({inputs['series_out_of_scope']} series out of the "
        f"model's scope), {inputs['inputs_failed']} failed"
    )
    console.print(
        f"{site['n_studies']} studies, {site['n_slices']} slices "
        f"({site['n_out_of_distribution']} out of distribution, not used)"
    )
    console.print(
        f"threshold {rec['threshold']:.6g} at target slice FPR {rec['fpr']} from "
        f"{site['calibration_studies']} calibration studies ({site['calibration_slices']} "
        f"slices, observed FPR {rec['observed_fpr']:.3f}); flag rule: {rec['rule']}"
    )
    held = site["heldout"]
    if held is None:
        console.print("[yellow]no studies held out (--holdout 0): the FPR is not measured[/]")
        return
    console.print(f"held out ({site['holdout']:.0%} of studies, seed {site['seed']}): "
                  + heldout_line(held))  # fmt: skip
    if held["n_not_assessed"]:
        console.print(f"[yellow]{held['n_not_assessed']} held-out studies had no slice in "
                      "distribution: not assessed[/]")  # fmt: skip
    if held["n_studies"] < 20:
        console.print(
            f"[yellow]only {held['n_studies']} held-out studies: the intervals are wide; "
            "more normal studies narrow them[/]"
        )
