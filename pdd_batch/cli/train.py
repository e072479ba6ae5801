"""`pdd-batch train DATA --out DIR`: train a model on normal images (rich progress bar)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pdd_batch.cli.options import (
    AddressOption,
    TeacherWeightsOption,
    load_items,
    teacher_overrides,
)
from pdd_batch.cli.pacs import NetrcOption, StudyUidFileOption
from pdd_batch.evaluation.datasets import ImageItem

# jobs.selection.CANDIDATES, repeated here so `--help` loads no torch (a test keeps them equal).
SELECTION_CANDIDATES = ("lite0", "lite0-d", "rd4ad")

if TYPE_CHECKING:  # jobs and model load torch: imported only inside the command
    from jobs.selection import Candidate
    from jobs.train import TrainConfig, TrainProgress, TrainResult
    from model.config import ModelConfig


def train_command(
    data: Annotated[
        str,
        typer.Argument(
            help="Image folder (class sub-folders) or split CSV; with --archive a folder of "
            "studies or dicomweb+http(s)://HOST/ROOT with --study-uid-file."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint folder to write.")],
    split_file: Annotated[
        Path | None, typer.Option(help="CSV path,label,split (paths relative to DATA or above).")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help="Train exactly this config, no selection: lite0 (PDD as PDD_SPEC defines it, "
            "Lite0 teacher, σ 4 px), lite0-d (targets detached, σ 2 px), lite0-c, rd4ad (the "
            "RD4AD baseline), astra, paper, test. Default: select among --candidates."
        ),
    ] = None,
    candidates: Annotated[
        str,
        typer.Option(
            help="Comma-separated configs that selection trains; the one with the best "
            "synthetic-lesion AUROC on held-out validation normals is kept (the first is the "
            "default when too few normals can be held out)."
        ),
    ] = ",".join(SELECTION_CANDIDATES),
    teacher_weights: TeacherWeightsOption = None,
    epochs: Annotated[int, typer.Option(min=1)] = 100,
    image_size: Annotated[int | None, typer.Option(help="Input side S (multiple of 32).")] = None,
    map_sigma: Annotated[
        float | None,
        typer.Option(help="Anomaly-map blur in pixels (lesion-scale dependent; default: config)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    seed: Annotated[int, typer.Option(help="Seeds head init and shuffling.")] = 0,
    max_images: Annotated[int | None, typer.Option(min=1, help="Cap on training images.")] = None,
    augment_views: Annotated[
        int,
        typer.Option(
            min=0, help="K seeded views per image (flip/rotate/shift/scale; 0: no augmentation)."
        ),
    ] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/resume.pt.")] = False,
    archive: Annotated[
        bool,
        typer.Option(
            help="DATA is a site's normal DICOM/NIfTI studies (all slices): a folder, or a PACS "
            "(dicomweb+http(s)://...) with --study-uid-file."
        ),
    ] = False,
    study_uid_file: StudyUidFileOption = None,
    netrc: NetrcOption = None,
    address: AddressOption = None,
    scope: Annotated[
        str | None,
        typer.Option(
            help="What the model will know, e.g. modality=CT,body_part=HEAD,orientation=axial "
            "(required for image folders; with --archive it is derived from the headers)."
        ),
    ] = None,
    framing: Annotated[
        str,
        typer.Option(
            help="Field of view the model sees (stored in the checkpoint; screen, calibrate and "
            "evaluate apply it): auto (by the scope's modality: CT ct-head-v1, MR mr-v1, "
            "CR/DX radiograph-v1), ct-head-v1, radiograph-v1, mr-v1, none (whole image)."
        ),
    ] = "auto",
    keep_candidates: Annotated[
        bool,
        typer.Option(
            help="Keep every selection candidate's checkpoint in OUT/candidates/NAME (default: "
            "only the kept model)."
        ),
    ] = False,
) -> None:
    """Train on the normal images of DATA (the `train` split when a split file is given).

    Without --config, every --candidates config is trained on the training normals and the one
    with the best synthetic-lesion AUROC on held-out validation normals (the split file's `val`
    rows, else 20 % of the patients / files / studies) is kept. `test` rows are never read.
    With --archive, DATA is a folder of normal studies read exactly as `screen` reads them, or
    a PACS whose listed studies are fetched into a private temporary folder first.
    """
    from jobs.train import TrainConfig, TrainError
    from model.config import ConfigError, get_config

    console = Console()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    items, desc = _training_data(
        console, data, split_file, archive, (study_uid_file, netrc), select=config is None
    )
    scope_dict = _scope_option(console, scope, archive)
    overrides = teacher_overrides(console, teacher_weights)
    if image_size is not None:
        overrides["image_size"] = image_size
    if map_sigma is not None:
        overrides["map_sigma"] = map_sigma
    try:
        run = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            max_images=max_images,
            augment_views=augment_views,
        )
        if config is None:
            cands = _candidates(candidates, overrides)
        else:
            cfg = get_config(config, **overrides)
    except (ConfigError, TrainError) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from exc
    with _fetched(console, items, address) as data_in:
        if config is None:
            _select(console, data_in, out, cands, run, resume=resume, address=address, desc=desc,
                    scope=scope_dict, framing=framing, keep_candidates=keep_candidates)  # fmt: skip
            return
        result = _train_with_progress(
            console, data_in, out, cfg, run, resume=resume, address=address, desc=desc,
            scope=scope_dict, framing=framing,
        )  # fmt: skip
    for err in result.errors:
        console.print(f"[yellow]skipped {err['file']}: {err['reason']}[/]")
    console.print(
        f"trained {cfg.name} ({cfg.arch}, {cfg.image_size} px) on {result.n_images} images, "
        f"{len(result.errors)} skipped, "
        f"{result.epochs_run} epochs, final loss {result.epoch_losses[-1]:.4f}, "
        f"{result.wall_s:.0f} s -> {result.checkpoint}"
    )
    _print_scope(console, result.checkpoint)


def _scope_option(console: Console, text: str | None, archive: bool) -> dict | None:
    """``--scope`` parsed (exit 2 with the reason when bad, or absent for an image folder)."""
    from pdd_batch.ingest.scope import ScopeError, scope_record

    if text is None:
        if archive:
            return None  # derived from the archive's headers
        console.print(
            "[red]training from an image folder needs --scope, e.g. "
            "--scope modality=CT,body_part=HEAD,orientation=axial (what the images are; "
            "screening sends a model only the series its scope matches)[/]"
        )
        raise typer.Exit(code=2)
    try:
        return scope_record(text)
    except ScopeError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from exc


def _print_scope(console: Console, checkpoint: Path) -> None:
    """The scope the checkpoint records, in one line (a warning when no body part is known)."""
    import json

    from pdd_batch.ingest.scope import ModelScope

    meta = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    scope = ModelScope.from_dict(meta.get("scope"))
    console.print(f"model scope ({scope.source}): {scope.describe()}")
    console.print(f"framing: {meta['preprocessing'].get('framing') or 'none (the whole image)'}")
    if scope.known and not scope.body_parts:
        console.print(
            "[yellow]no training header names a body part: the model will take series of any "
            "body part of its modality; state it with --scope to narrow it[/]"
        )


def _training_data(
    console: Console,
    data: str,
    split_file: Path | None,
    archive: bool,
    pacs: tuple[Path | None, Path | None],
    *,
    select: bool = False,
) -> tuple[Any, str]:
    """DATA as training input: an archive folder, a PACS's listed studies
    (``jobs.pacs_studies.PacsStudies``), or the listed images (exit 2 when unusable); with
    ``select``, a split file's ``val`` rows too (never its ``test`` rows)."""
    from pdd_batch.cli.site_source import archive_source, describe_source

    if not archive:
        if any(p is not None for p in pacs):
            console.print("[red]--study-uid-file and --netrc go with --archive dicomweb+...[/]")
            raise typer.Exit(code=2)
        if select and split_file is not None:
            return load_items(console, Path(data), split_file, None, splits=("train", "val"))
        return load_items(console, Path(data), split_file, "train" if split_file else None)
    source = archive_source(console, data, *pacs)
    if isinstance(source, Path):
        return source, f"archive {source.name} (all slices)"
    return source, describe_source(source) + " (all slices)"


@contextmanager
def _fetched(console: Console, data: Any, address: str | None) -> Iterator[Any]:
    """The training input itself, or for a PACS the folder its studies were fetched into (a
    private temporary folder, deleted afterwards); exit 2 when the PACS cannot be used."""
    if isinstance(data, (Path, list)):
        yield data
        return
    from jobs.pacs_studies import fetched_studies
    from pdd_batch.ingest.dicomweb import DicomwebError

    try:
        with fetched_studies(data, address=address) as (folder, report):
            console.print(
                f"PACS {data.endpoint.host}: {report.fetched} series fetched "
                f"({report.instances} instances), {len(report.failed)} failed"
            )
            yield folder
    except DicomwebError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(code=2) from None


def _train_with_progress(
    console: Console,
    items: list[ImageItem] | Path,
    out: Path,
    cfg: ModelConfig,
    run: TrainConfig,
    *,
    resume: bool,
    address: str | None,
    desc: str,
    scope: dict | None = None,
    framing: str = "auto",
) -> TrainResult:
    """``jobs.train.run_training`` under a progress bar; exit 1 with the reason when it fails."""
    from rich.progress import Progress

    from jobs.train import TrainError, run_training
    from model.config import ConfigError
    from model.teachers import TeacherWeightsError

    columns = _epoch_columns()
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(
            "teacher features", total=run.epochs, epoch=0, epochs=run.epochs, loss="-"
        )

        def report(p: TrainProgress) -> None:
            if p.phase == "features":
                return
            done = p.epoch - 1 + (p.step / p.steps_per_epoch if p.step else 1.0)
            bar.update(task, description="training", completed=done, epoch=p.epoch,
                       loss=f"{p.loss:.4f}")  # fmt: skip

        try:
            return run_training(items, out, cfg, run, resume=resume, progress=report,
                                address=address, data_description=desc,
                                scope=scope, framing=framing)  # fmt: skip
        except (TrainError, TeacherWeightsError, ConfigError) as exc:
            console.print(f"[red]training failed: {exc}[/]")
            raise typer.Exit(code=1) from exc


def _candidates(text: str, overrides: dict[str, Any]) -> list[Candidate]:
    """``--candidates`` as selection candidates (ConfigError on an unknown name)."""
    from jobs.selection import candidates
    from model.config import ConfigError

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--candidates names no config")
    return candidates(names, **overrides)


def _select(
    console: Console,
    items: list[ImageItem] | Path,
    out: Path,
    cands: list[Candidate],
    run: TrainConfig,
    *,
    resume: bool,
    address: str | None,
    desc: str,
    scope: dict | None,
    framing: str = "auto",
    keep_candidates: bool = False,
) -> None:
    """``jobs.selection.run_selection`` under one progress bar per candidate, then the figures."""
    from rich.progress import Progress

    from jobs.selection import run_selection
    from jobs.train import TrainError
    from model.config import ConfigError
    from model.teachers import TeacherWeightsError

    columns = _epoch_columns()
    with Progress(*columns, console=console) as bar:
        tasks: dict[str, Any] = {}

        def report(name: str, p: TrainProgress) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(f"candidate {name}", total=p.epochs, epoch=0,
                                           epochs=p.epochs, loss="-")  # fmt: skip
            if p.phase == "features":
                bar.update(tasks[name], description=f"candidate {name}: teacher features")
                return
            done = p.epoch - 1 + (p.step / p.steps_per_epoch if p.step else 1.0)
            bar.update(tasks[name], description=f"candidate {name}: training", completed=done,
                       epoch=p.epoch, loss=f"{p.loss:.4f}")  # fmt: skip

        try:
            sel = run_selection(items, out, cands, run, address=address, progress=report,
                                data_description=desc, scope=scope, resume=resume,
                                framing=framing, keep_candidates=keep_candidates)  # fmt: skip
        except (TrainError, TeacherWeightsError, ConfigError) as exc:
            console.print(f"[red]training failed: {exc}[/]")
            raise typer.Exit(code=1) from exc
    _print_selection(console, sel.record)
    res = sel.result
    for err in res.errors:
        console.print(f"[yellow]skipped {err['file']}: {err['reason']}[/]")
    console.print(
        f"kept {sel.chosen} on {res.n_images} images, {len(res.errors)} skipped, "
        f"{res.epochs_run} epochs, final loss {res.epoch_losses[-1]:.4f} -> {res.checkpoint}"
    )
    _print_scope(console, res.checkpoint)


def _print_selection(console: Console, record: dict[str, Any]) -> None:
    """Every candidate's figure and why the winner won (or why there was no selection)."""
    if "skipped" in record:
        console.print(f"[yellow]no selection: {record['skipped']}; trained the default "
                      f"{record['chosen']}[/]")  # fmt: skip
        return
    title = f"selection: synthetic-lesion AUROC on held-out normals ({record['holdout']})"
    console.print(candidate_table(record, title, "AUROC"))
    console.print(record["why"])


def _epoch_columns() -> tuple[Any, ...]:
    """The columns of a training progress bar: what, bar, epoch and loss, time."""
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    return (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}  loss {task.fields[loss]}"),
        TimeElapsedColumn(),
    )


def candidate_table(record: dict[str, Any], title: str, figure_column: str) -> Table:
    """A selection record's candidates, a row each: config, model, figure, interval, kept."""
    table = Table(title=title)
    for col in ("candidate", "model", figure_column, "95% interval", "kept"):
        table.add_column(col)
    for r in record["candidates"]:
        f = r["figure"]
        table.add_row(r["config"], f"{r['arch']}, σ {r['map_sigma']:g}", f"{f['auroc']:.3f}",
                      f"{f['ci95'][0]:.3f}–{f['ci95'][1]:.3f}",
                      "yes" if r["config"] == record["chosen"] else "")  # fmt: skip
    return table
