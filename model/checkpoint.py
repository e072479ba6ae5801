"""Self-describing checkpoints: ``model.safetensors`` + ``config.json`` in one folder.

``model.safetensors`` holds only what training changed (the head's parameters and BN buffers).
Teachers are never stored: ``config.json`` references them by source and sha256 (random teachers
by seed, plus the sha256 of the weights that seed produced), and ``load_checkpoint`` rebuilds and
verifies them. ``config.json`` also holds the preprocessing, calibration, training info, code
version, ``model_id`` and ``checkpoint_hash`` (the sha256 of ``model.safetensors``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from model.config import ConfigError, ModelConfig
from model.ood import OODCheck, ood_from_tensors
from model.teachers import Teacher, TeacherWeightsError
from model.weight_files import WeightFileError, file_sha256, verify_file_sha256

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
OOD_FILE = "ood.safetensors"
CONFIG_FILE = "config.json"
# Seeded teachers up to this size are stored beside the head (``<teacher>.safetensors``): a seed
# does not reproduce the same weights on every torch version (torch 2.11 on an H200 drew other
# weights for the default model's VMamba seed than torch 2.14 here). Larger seeded teachers
# (random ResNets of the experiments) stay referenced by seed and hash only.
STORED_SEEDED_MAX_BYTES = 8 * 1024**2


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the model it describes."""


@dataclass(frozen=True)
class LoadedModel:
    """A model rebuilt from a checkpoint, in eval mode, with its metadata.

    Attributes:
        model: the rebuilt model (``PDD`` or ``RD4AD``).
        config: its ``ModelConfig`` (teacher specs carry the verified sha256).
        preprocessing: the ``PreprocessSpec`` dict the model was trained with.
        calibration: the calibration dict (threshold etc.) or None.
        checkpoint_hash: sha256 of ``model.safetensors``.
        model_id: ``"<config name>-<first 12 hex of checkpoint_hash>"``.
        meta: the whole ``config.json``.
        ood: the in-distribution check (``model.ood``) or None when the checkpoint has none.
    """

    model: nn.Module
    config: ModelConfig
    preprocessing: dict[str, Any]
    calibration: dict[str, Any] | None
    checkpoint_hash: str
    model_id: str
    meta: dict[str, Any]
    ood: OODCheck | None = None


def teacher_modules(model: nn.Module) -> dict[str, Teacher]:
    """The frozen teachers inside ``model``, by module name (e.g. ``"teacher_cnn"``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Teacher)}


def _role(module_name: str, kind: str) -> str:
    """A teacher's role ("cnn" | "mamba") from its slot in the model (a CNN can fill Teacher M's
    slot, ``model.pdd.SecondCNNTeacher``); its kind for other module names."""
    slot = module_name.removeprefix("teacher_")
    return slot if slot in ("cnn", "mamba") else kind


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict without its teachers (head parameters and BN buffers), on CPU."""
    prefixes = tuple(f"{name}." for name in teacher_modules(model))
    return {
        k: v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(prefixes)
    }


def _config_with_teacher_hashes(model: nn.Module) -> tuple[ModelConfig, dict[str, Any]]:
    """The model's config with each teacher's verified sha256 filled in, and their provenance."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise CheckpointError("model has no ModelConfig in .config; cannot describe it")
    changes: dict[str, Any] = {}
    provenance: dict[str, Any] = {}
    for name, teacher in teacher_modules(model).items():
        role = f"{_role(name, teacher.spec.kind)}_teacher"
        declared = getattr(config, role)
        if declared is None or replace(declared, sha256=None) != replace(teacher.spec, sha256=None):
            raise CheckpointError(f"teacher '{name}' does not match config.{role}")
        changes[role] = replace(declared, sha256=teacher.provenance["state_sha256"])
        provenance[name] = teacher.provenance
    return replace(config, **changes), provenance


def _code_version() -> dict[str, str | None]:
    try:
        version: str | None = metadata.version("pdd-batch")
    except metadata.PackageNotFoundError:
        version = None
    commit = None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        commit = out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"package": version, "git_commit": commit, "torch": torch.__version__}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temp file in the same folder, then rename over ``path``."""
    try:
        text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint metadata is not JSON-serialisable: {exc}") from exc
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_safetensors_atomic(
    state: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None
) -> str:
    """Write ``state`` to a temp file beside ``path``, rename it over ``path``; its sha256."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        digest = file_sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def save_checkpoint(
    model: nn.Module,
    out_dir: str | Path,
    *,
    preprocessing: dict[str, Any],
    calibration: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    scope: dict[str, Any] | None = None,
    ood: OODCheck | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``out_dir`` (created if needed).

    Args:
        model: a ``PDD`` (or ``RD4AD``) with ``.config`` and ``Teacher`` submodules.
        out_dir: checkpoint folder.
        preprocessing: ``PreprocessSpec.to_dict()`` the model was trained with.
        calibration: calibration dict (see docs/architecture.md) or None.
        training: free-form training info (epochs, data description, losses) or None.
        scope: what the model knows (``pdd_batch.ingest.scope.ModelScope.to_dict()``); None
            records "unknown" (every series is scored, with a warning).
        ood: the in-distribution check fitted on the training images (``model.ood.fit_ood``),
            written to ``ood.safetensors``; None: no check.

    Returns:
        ``out_dir`` as a Path.
    """
    if not isinstance(preprocessing, dict):
        raise ValueError("preprocessing must be a dict (PreprocessSpec.to_dict())")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config, teachers = _config_with_teacher_hashes(model)
    checkpoint_hash = _save_safetensors_atomic(
        trainable_state(model), out / WEIGHTS_FILE, {"format_version": str(FORMAT_VERSION)}
    )
    for name, stored in _store_seeded_teachers(model, out).items():
        teachers[name] = {**teachers[name], "stored_copy": stored}
    meta = {
        "format_version": FORMAT_VERSION,
        "model_config": config.to_dict(),
        "teachers": teachers,
        "preprocessing": preprocessing,
        "calibration": calibration,
        "training": training,
        "scope": scope if scope is not None else "unknown",
        "code_version": _code_version(),
        "checkpoint_hash": checkpoint_hash,
        "model_id": f"{config.name}-{checkpoint_hash[:12]}",
    }
    if ood is not None:
        meta["ood"] = _save_ood(ood, out)
    _write_json_atomic(out / CONFIG_FILE, meta)
    log.info("saved checkpoint %s", meta["model_id"])
    return out


def _save_ood(ood: OODCheck, out: Path) -> dict[str, Any]:
    """Write ``ood.safetensors``; the ``config.json`` record of it."""
    digest = _save_safetensors_atomic(ood.tensors(), out / OOD_FILE)
    return {**ood.info(), "file": OOD_FILE, "sha256": digest}


def read_ood(path: str | Path, meta: dict[str, Any] | None = None) -> OODCheck | None:
    """The in-distribution check of a checkpoint (None when it records none), sha256 verified."""
    folder = _checkpoint_dir(path)
    info = (meta if meta is not None else read_meta(folder)).get("ood")
    if not info:
        return None
    file = folder / str(info.get("file", OOD_FILE))
    if not file.is_file():
        raise CheckpointError(f"checkpoint in-distribution check missing: {file}")
    if file_sha256(file) != info.get("sha256"):
        raise CheckpointError(f"{file}: sha256 differs from {CONFIG_FILE} (corrupt or replaced)")
    return ood_from_tensors(load_file(str(file)), info)


def set_ood(path: str | Path, ood: OODCheck) -> None:
    """Add or replace a checkpoint's in-distribution check (weights and model_id unchanged)."""
    folder = _checkpoint_dir(path)
    meta = read_meta(folder)
    meta["ood"] = _save_ood(ood, folder)
    _write_json_atomic(folder / CONFIG_FILE, meta)


def _store_seeded_teachers(model: nn.Module, out: Path) -> dict[str, dict[str, str]]:
    """Write each small seeded teacher's weights to ``out/<name>.safetensors``.

    Returns ``{teacher name: {"file": file name, "sha256": file hash}}`` for ``config.json``.
    """
    stored = {}
    for name, teacher in teacher_modules(model).items():
        if teacher.spec.source != "random":
            continue
        state = {
            k: v.detach().to("cpu").contiguous() for k, v in teacher.backbone.state_dict().items()
        }
        if sum(v.numel() * v.element_size() for v in state.values()) > STORED_SEEDED_MAX_BYTES:
            continue
        digest = _save_safetensors_atomic(state, out / f"{name}.safetensors")
        stored[name] = {"file": f"{name}.safetensors", "sha256": digest}
    return stored


def _stored_teachers(folder: Path, recorded: dict[str, Any]) -> dict[str, Path]:
    """The stored copies of seeded teachers a checkpoint records, by role, each verified."""
    stored = {}
    for name, info in recorded.items():
        copy = info.get("stored_copy") if isinstance(info, dict) else None
        if not copy:
            continue
        path = folder / copy["file"]
        if not path.is_file():
            raise CheckpointError(f"checkpoint teacher copy missing: {path}")
        if file_sha256(path) != copy["sha256"]:
            raise CheckpointError(
                f"{path}: sha256 differs from {CONFIG_FILE} (corrupt or replaced)"
            )
        stored[_role(name, info["kind"])] = path
    return stored


def _checkpoint_dir(path: str | Path) -> Path:
    p = Path(path)
    return p.parent if p.is_file() else p


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder (or of a file inside it)."""
    cfg_path = _checkpoint_dir(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in checkpoint folder {cfg_path.parent}")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {cfg_path}: {exc}") from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format_version {version!r}, expected {FORMAT_VERSION}")
    return meta


def _with_teacher_weights(config: ModelConfig, teacher_weights: dict[str, str]) -> ModelConfig:
    """The config with moved teacher weight files pointed to; each role must be file-sourced."""
    changes = {}
    for role, path in teacher_weights.items():
        key = f"{role}_teacher"
        spec = getattr(config, key, None)
        if spec is None:
            raise ConfigError(f"teacher_weights: config has no {key}")
        if spec.source != "file":
            raise TeacherWeightsError(
                f"the {role} teacher of this checkpoint does not come from a file (source "
                f"{spec.source!r}), so there is no weight file to point to"
            )
        changes[key] = replace(spec, weights=str(path))
    return replace(config, **changes)


def _model_config(meta: dict[str, Any], folder: Path) -> ModelConfig:
    """The ``ModelConfig`` recorded in a checkpoint's ``config.json``."""
    try:
        return ModelConfig.from_dict(meta["model_config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE}: bad model_config: {exc}") from exc


def _check_teacher_files(config: ModelConfig) -> None:
    """A file-sourced teacher whose file is gone: say what to do (before any work is done)."""
    for role in ("cnn", "mamba"):
        spec = getattr(config, f"{role}_teacher", None)
        if spec is not None and spec.source == "file" and not Path(str(spec.weights)).is_file():
            raise TeacherWeightsError(
                f"the {role} teacher's weights are not at {spec.weights} (the checkpoint refers "
                f"to them by path and sha256): put the file back there, or give where it is "
                f"now with --teacher-weights {role}=PATH"
            )


def _verify_teacher_files(config: ModelConfig, recorded: dict[str, Any]) -> None:
    """Each file-sourced teacher's file must have the sha256 recorded at training time.

    Checked on the raw bytes before the file is parsed, so a replaced file is never read. One
    exception: a ``.safetensors`` file given for a recorded torch file (a conversion) has other
    bytes by nature; safetensors runs no code, and its weights still have to match the recorded
    ``state_sha256`` after loading (``build_teacher``).
    """
    files = {
        info.get("kind"): info
        for info in recorded.values()
        if isinstance(info, dict) and info.get("source") == "file"
    }
    for role in ("cnn", "mamba"):
        spec = getattr(config, f"{role}_teacher", None)
        then = files.get(role) or {}
        if spec is None or spec.source != "file" or not then.get("file_sha256"):
            continue
        now = Path(str(spec.weights))
        if now.suffix == ".safetensors" and Path(str(then.get("weights"))).suffix != now.suffix:
            log.info("%s teacher: safetensors conversion, verified by its state sha256", role)
            continue
        try:
            verify_file_sha256(now, then["file_sha256"])
        except WeightFileError as exc:
            raise TeacherWeightsError(
                f"teacher '{spec.name}' ({role}) weights are refused: {exc}"
            ) from None


def check_teacher_files(path: str | Path, teacher_weights: dict[str, str] | None = None) -> None:
    """Fail early, before any cluster work, when a file-sourced teacher's weights are not where
    the checkpoint (or ``teacher_weights``) says; cheap: reads ``config.json`` only.

    Raises:
        CheckpointError: unreadable checkpoint metadata.
        TeacherWeightsError: a weight file is missing (the message says how to point to it).
    """
    folder = _checkpoint_dir(path)
    config = _model_config(read_meta(folder), folder)
    _check_teacher_files(_with_teacher_weights(config, teacher_weights or {}))


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    teacher_weights: dict[str, str] | None = None,
) -> LoadedModel:
    """Rebuild a model from a checkpoint folder, teachers verified, weights loaded strictly.

    Args:
        path: checkpoint folder (or a file inside it).
        device: where to put the model.
        teacher_weights: optional new locations of file-sourced teacher weights by role
            (``{"cnn": PATH, "mamba": PATH}``) when they moved; their sha256 is still verified.

    Raises:
        CheckpointError: missing/corrupt files, hash mismatch, or missing/unexpected keys.
        TeacherWeightsError: a teacher's weights are missing or not the recorded ones.
    """
    from model.pdd import build_model

    folder = _checkpoint_dir(path)
    meta = read_meta(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights missing: {weights}")
    actual = file_sha256(weights)
    if actual != meta.get("checkpoint_hash"):
        raise CheckpointError(
            f"{weights}: sha256 {actual[:16]}… differs from checkpoint_hash "
            f"{str(meta.get('checkpoint_hash'))[:16]}… in {CONFIG_FILE} (corrupt or replaced)"
        )
    config = _with_teacher_weights(_model_config(meta, folder), teacher_weights or {})
    _check_teacher_files(config)
    _verify_teacher_files(config, meta.get("teachers") or {})
    model = build_model(config, _stored_teachers(folder, meta.get("teachers") or {}))
    _check_teacher_inputs(model, meta.get("teachers") or {}, folder)
    _load_strict(model, load_file(str(weights)), weights)
    model.to(device).eval()
    return LoadedModel(
        model=model,
        config=config,
        preprocessing=meta["preprocessing"],
        calibration=meta.get("calibration"),
        checkpoint_hash=actual,
        model_id=meta["model_id"],
        meta=meta,
        ood=read_ood(folder, meta),
    )


def _check_teacher_inputs(model: nn.Module, recorded: dict[str, Any], folder: Path) -> None:
    """Each teacher must see its input normalised as when the checkpoint was trained.

    The weights hash cannot catch a change in how a teacher converts its input (e.g. the
    EfficientNet-Lite0 package weights' (x - 0.5) / 0.5), yet such a change moves every score.
    """
    for name, teacher in teacher_modules(model).items():
        then = recorded.get(name, {})
        for key in ("input_mean", "input_std"):
            if key not in then:
                continue  # older checkpoints did not record it
            now = [float(v) for v in teacher.provenance[key]]
            if not torch.allclose(torch.tensor(now), torch.tensor(then[key], dtype=torch.float32)):
                raise CheckpointError(
                    f"{folder / CONFIG_FILE}: teacher '{name}' was trained with {key} "
                    f"{then[key]}, but this code feeds it {now}; retrain or use the code version "
                    "the checkpoint records"
                )


def _load_strict(model: nn.Module, state: dict[str, Tensor], origin: Path) -> None:
    own = trainable_state(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"{origin} does not match the model: missing keys {missing[:8]}, unexpected keys "
            f"{unexpected[:8]}, shape mismatches {bad_shape[:8]}"
        )
    result = model.load_state_dict(state, strict=False)
    leftover = [k for k in result.missing_keys if k in own]
    if leftover or result.unexpected_keys:  # cannot happen after the checks above
        raise CheckpointError(f"{origin}: keys not loaded {leftover + result.unexpected_keys}")


def set_scope(path: str | Path, scope: dict[str, Any]) -> None:
    """Replace the scope in a checkpoint's ``config.json`` atomically (the weights, hence the
    ``checkpoint_hash`` and ``model_id``, are unchanged).

    Raises:
        ValueError: ``scope`` is not a dict with a ``modalities`` list.
        CheckpointError: the checkpoint's ``config.json`` is missing or unreadable.
    """
    if not isinstance(scope, dict) or not isinstance(scope.get("modalities"), list):
        raise ValueError("scope must be a dict with a 'modalities' list (ModelScope.to_dict())")
    folder = _checkpoint_dir(path)
    meta = read_meta(folder)
    meta["scope"] = scope
    _write_json_atomic(folder / CONFIG_FILE, meta)


def set_calibration(path: str | Path, calibration: dict[str, Any]) -> None:
    """Replace the calibration in a checkpoint's ``config.json`` atomically (temp + rename).

    Raises:
        ValueError: ``calibration`` is not a dict with a numeric ``threshold``.
        CheckpointError: the checkpoint's ``config.json`` is missing or unreadable.
    """
    if not isinstance(calibration, dict):
        raise ValueError("calibration must be a dict")
    try:
        float(calibration["threshold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError("calibration['threshold'] must be a number") from exc
    folder = _checkpoint_dir(path)
    meta = read_meta(folder)
    meta["calibration"] = calibration
    _write_json_atomic(folder / CONFIG_FILE, meta)


def set_selection(path: str | Path, selection: dict[str, Any]) -> None:
    """Store how the checkpoint's configuration was chosen (``jobs.selection``) under
    ``config.json`` → ``training.selection``, atomically.

    Raises:
        ValueError: ``selection`` is not a JSON-serialisable dict.
        CheckpointError: the checkpoint's ``config.json`` is missing or unreadable.
    """
    if not isinstance(selection, dict):
        raise ValueError("selection must be a dict")
    folder = _checkpoint_dir(path)
    meta = read_meta(folder)
    training = dict(meta.get("training") or {})
    training["selection"] = selection
    meta["training"] = training
    _write_json_atomic(folder / CONFIG_FILE, meta)
