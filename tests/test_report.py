"""`pdd-batch report`: a self-contained HTML page, rendered in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from run_factory import build_run
from typer.testing import CliRunner, Result

from pdd_batch.cli.app import app
from pdd_batch.review.report import build_report, markdown_to_html, svg_histogram, write_report
from pdd_batch.runs.results import open_run

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--force-device-scale-factor=1", "--hide-scrollbars", "--window-size=1280,1400",
]  # fmt: skip
THUMB_PX = 64  # heatmap grid of the synthetic run


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip(
            "chromium is not installed (apt-get install -y chromium) - browser test skipped"
        )
    return exe


def _browse(exe: str, tmp: Path, page: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}", *extra]
    return subprocess.run(
        [*args, page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("report")
    run = build_run(base)
    card = base / "ckpt" / "model_card.md"
    card.parent.mkdir()
    card.write_text("# PDD test model\n\nTrained on **synthetic** normals.\n\n- AUROC: n/a\n")
    page = write_report(open_run(run.run_dir), base / "out" / "report.html", card.parent)
    return run, page


def test_report_is_self_contained_and_private(report) -> None:
    run, page = report
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text, re.I)
    assert "<link" not in text.lower() and "@import" not in text and "url(" not in text
    assert text.count('src="data:image/png;base64,') == 2  # one thumbnail per flagged study
    assert text.count("<svg") == 2
    for ident in run.identities:
        for s in ident.strings():
            assert s not in text
    for s in [*run.uids, "Doe/series", "Poe_Edgar", str(run.archive)]:
        assert s not in text
    assert (
        "Trained on <strong>synthetic</strong> normals." in text and "<li>AUROC: n/a</li>" in text
    )


def test_report_renders_in_chromium(report, tmp_path: Path) -> None:
    exe = _chromium()
    run, page = report
    dom = _browse(exe, tmp_path, page, "--dump-dom").stdout
    expected_texts = [
        "Top slices with anomaly heatmaps",
        "Review queue: flagged, then not assessed studies",
        "Score distributions",
        "Model card",
        "PDD test model",
        "every input accounted for",
        run.study_keys[0],
        run.study_keys[2],
    ]
    for expected in expected_texts:
        assert expected in dom, expected
    rects = [tuple(map(int, m.split(","))) for m in re.findall(r'data-rect="([\d,]+)"', dom)]
    assert len(rects) == 2  # the page's script ran and laid out both thumbnails

    shot = tmp_path / "shot.png"
    _browse(exe, tmp_path, page, f"--screenshot={shot}")
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)  # (H, W, 3)
    assert rgb.std() > 20  # not blank
    # The first thumbnail is study 1's top slice: its hot spot must be red at the right place.
    res = open_run(run.run_dir)
    top = res.top_slices(run.study_keys[0], 1).to_pylist()[0]
    y, x = run.hot[top["slice_key"]]
    left, top_px, w, h = rects[0]
    crop = rgb[top_px + 1 : top_px + h - 1, left + 1 : left + w - 1]  # inside the 1 px border
    red = (crop[..., 0] - crop[..., 2] > 80) & (crop[..., 0] > 150)
    assert red.sum() > 50
    ys, xs = np.nonzero(red)
    scale = crop.shape[0] / THUMB_PX
    assert abs(ys.mean() - (y - 0.5) * scale) < 2 * scale
    assert abs(xs.mean() - (x - 0.5) * scale) < 2 * scale
    # ... and the slice underneath shows: brain grey inside the thumbnail, not only heatmap
    grey = (np.abs(crop[..., 0] - crop[..., 2]) < 10) & (crop[..., 0] > 60) & (crop[..., 0] < 140)
    assert grey.sum() > 0.1 * grey.size
    # the flagged badge colour (#ffd8b5) shows where the studies table is
    badge = (np.abs(rgb - np.array([255, 216, 181])).sum(axis=-1) < 12).sum()
    assert badge > 20


def test_no_model_card_falls_back_to_id_and_hash(tmp_path: Path) -> None:
    run = build_run(tmp_path, with_nifti=False)
    text = build_report(open_run(run.run_dir), model_dir=None)
    assert "No model card found" in text and "pdd-test" in text and "c0ffee" in text


def test_markdown_and_svg_helpers_escape_html() -> None:
    html = markdown_to_html("# T <x>\n\n```\n<script>\n```\n- a `b`\n")
    assert "<script>" not in html and "&lt;script&gt;" in html and "<code>b</code>" in html
    svg = svg_histogram({"a <b>": ([0.1, 0.2, 0.2], "#123456")}, "t", threshold=0.15, bins=2)
    assert svg.count("<rect") == 3 and "a &lt;b&gt;" in svg and "threshold 0.15" in svg


def test_report_command(tmp_path: Path) -> None:
    run = build_run(tmp_path, with_nifti=False)
    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", str(run.run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("<!DOCTYPE html>")
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "nope"), "--out", str(out)])
    assert bad.exit_code == 2


def _test_checkpoint(out: Path) -> Path:
    """The seeded "test"-size PDD, calibrated at threshold 0 so that every slice is flagged."""
    torch = pytest.importorskip("torch")
    from model.checkpoint import save_checkpoint
    from model.config import get_config
    from model.pdd import build_model
    from pdd_batch.ingest.preprocess import PreprocessSpec

    torch.set_num_threads(1)
    torch.manual_seed(0)
    calibration = {"method": "fpr", "fpr": 0.05, "threshold": 0.0, "n_normals": 1,
                   "split": "val", "data": "synthetic test"}  # fmt: skip
    spec = PreprocessSpec(image_size=64).to_dict()
    return save_checkpoint(
        build_model(get_config("test")), out, preprocessing=spec, calibration=calibration
    )


def _cli(*args: str) -> Result:
    """``pdd-batch ARGS`` run in this process (``CliRunner``): exit code, stdout, stderr."""
    return CliRunner().invoke(app, list(args))


@pytest.mark.slow
@pytest.mark.ray
def test_end_to_end_screen_export_report(tmp_path: Path, shared_ray) -> None:
    """screen (test-size model, real local Ray: the session's shared one) -> summary -> export
    -> report, on an archive full of identifiers: every input accounted for, nothing identifying
    leaves."""
    pytest.importorskip("jobs.screen")
    run = build_run(tmp_path)  # its archive is what we screen; its synthetic run is ignored
    ckpt = _test_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "screen"
    screen = _cli("screen", str(run.archive), "--out", str(out), "--model", str(ckpt),
                  "--num-cpus", "2", "--num-actors", "1")  # fmt: skip
    assert screen.exit_code == 0, screen.output[-3000:]
    res = open_run(out)
    assert res.studies.num_rows == 3 and res.slices.num_rows == 4 + 4 + 3
    assert res.counts()["flagged_slices"] == res.slices.num_rows

    summary = _cli("summary", str(out))
    assert summary.exit_code == 0, summary.output[-3000:]
    for key in res.studies.column("study_key").to_pylist():
        assert key in summary.stdout

    exp, cw = tmp_path / "export", tmp_path / "private" / "cw.json"
    export = _cli("export", str(out), "--out", str(exp), "--secondary-capture",
                  "--crosswalk", str(cw), "--archive", str(run.archive))  # fmt: skip
    assert export.exit_code == 0, export.output[-3000:]
    forbidden = [s for i in run.identities for s in i.strings()] + run.uids + ["Doe/", "Poe_"]
    import gzip

    for p in (q for q in exp.rglob("*") if q.is_file()):
        raw = gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()
        assert not [s for s in forbidden if s.encode() in raw], p.relative_to(exp)
    pairs = [f for s in json.loads(cw.read_text())["studies"] for f in s["files"]]
    dicoms = [f for f in pairs if f["exported"].endswith(".dcm")]
    assert len(dicoms) == 8 and len(list(exp.rglob("overlays/*.png"))) == 11
    for f in dicoms:
        ds = pydicom.dcmread(exp / f["exported"])
        assert ds.PixelData == pydicom.dcmread(run.archive / f["source"]).PixelData

    page = tmp_path / "report.html"
    report = _cli("report", str(out), "--out", str(page), "--archive", str(run.archive))
    assert report.exit_code == 0, report.output[-3000:]
    text = page.read_text()
    assert text.count('class="thumb"') == 3
    assert not [s for s in forbidden if s in text]
    if shutil.which("chromium"):
        dom = _browse(shutil.which("chromium"), tmp_path, page, "--dump-dom").stdout
        assert len(re.findall(r'data-rect="[\d,]+"', dom)) == 3


def test_report_shows_each_outcome_its_ood_slices_and_the_model_cards_tables(
    tmp_path: Path,
) -> None:
    from test_study_outcome import _old_run

    card_dir = tmp_path / "ckpt"
    card_dir.mkdir()
    card = "# Card\n\n| split | AUROC |\n|---|---|\n| test | 0.865 |\n\n<script>x</script>\n"
    (card_dir / "model_card.md").write_text(card)
    text = build_report(open_run(_old_run(tmp_path)), model_dir=card_dir)
    body = text.split('<div class="card-md">', 1)[1]
    assert "<th>split</th>" in body and "<td>0.865</td>" in body
    assert "| split |" not in body and "<script>x" not in body
    studies = text.split('id="studies-table"', 1)[1].split("</table>", 1)[0]
    assert studies.count('class="badge not_assessed"') == 2
    assert "3/4 slices out of distribution" in studies
    ood = text.split('id="ood-table"', 1)[1].split("</table>", 1)[0]
    assert "3 / 4" in ood and ": 0, 1, 2<" in ood and "2 / 2" in ood
