"""Screening a PACS over DICOMweb, against a live Orthanc (tests/orthanc_server.py).

Real files from ../shared/data/dicom (a run of CQ500 head CT slices, a stray slice of another
study, three TCIA MR slices) where present, else synthetic series; plus a synthetic dated CT.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest
from conftest import SHARED
from dicom_factory import write_ct_series
from orthanc_server import FaultyProxy, orthanc_process
from screen_support import direct_scores, make_checkpoint
from typer.testing import CliRunner

from jobs.dicomweb_fetch import fetch_series, screen_pacs
from jobs.screen import run_screen
from pdd_batch.cli.app import app
from pdd_batch.ingest.dicomweb import (
    PASSWORD_ENV,
    USER_ENV,
    Endpoint,
    Query,
    SeriesHit,
    make_client,
    parse_since,
    query_series,
    run_query,
)
from pdd_batch.ingest.keys import series_key
from pdd_batch.runs.config import RunConfig
from pdd_batch.runs.manifest import EXIT_INCOMPLETE

# ../shared files or a synthetic fallback: .ci/run also runs these with ../shared hidden.
pytestmark = [pytest.mark.fallback]
DICOM = SHARED / "data" / "dicom"
runner = CliRunner()


def build_pacs_archive(root: Path) -> Path:
    """The files loaded into the PACS (and screened from disk for the comparison)."""
    ct = DICOM / "cq500_ct1_head_ct" / "series_4cc_D3D_0.625mm"
    if ct.is_dir():
        for f in sorted(ct.glob("*.dcm"))[40:64]:  # 24 contiguous slices (JPEG Lossless)
            (root / "ct").mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / "ct" / f.name)
        shutil.copytree(DICOM / "cq500_ct1_head_ct" / "stray_other_study_2.5-5mm", root / "stray")
        shutil.copytree(DICOM / "niivue_tcia_vs_seg_001_t1_3sl", root / "mr")
    else:  # the same dates as the real files: CQ500 has none, the TCIA MR is from 1994
        write_ct_series(root / "ct", n_slices=6, rows=32, cols=32, seed=11, study_date="")
        write_ct_series(root / "stray", n_slices=2, rows=32, cols=32, seed=12, study_date="")
        write_ct_series(root / "mr", n_slices=3, rows=32, cols=32, modality="MR", seed=13,
                        study_date="19940904")  # fmt: skip
    write_ct_series(root / "dated", n_slices=4, rows=32, cols=32, seed=14)  # StudyDate 2024-02-29
    return root


def headers(root: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(root.rglob("*.dcm"))]


def expected_series(root: Path) -> dict[str, tuple[str, str]]:
    """series key -> (modality, StudyDate) from the files themselves."""
    out = {}
    for ds in headers(root):
        key = series_key(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        out[key] = (str(ds.Modality), str(ds.get("StudyDate", "") or ""))
    return out


def identifiers(root: Path) -> set[str]:
    """Every patient name/ID and UID of the files (none may appear in any output)."""
    out: set[str] = set()
    for ds in headers(root):
        for tag in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID"):
            value = str(ds.get(tag, "") or "")
            if len(value) > 3:
                out.add(value)
        out.add(str(ds.SOPInstanceUID))
    return out


@pytest.fixture(scope="module")
def ray_local(shared_ray):
    """The session's shared local Ray (conftest ``shared_ray``; token auth, loopback only,
    private temp folder): the commands of the tests join it, no start per command."""
    from ray_support import use_shared_ray

    use_shared_ray()


@pytest.fixture(scope="module")
def world(orthanc, tmp_path_factory) -> dict:  # noqa: F811
    from model.checkpoint import set_calibration

    base = tmp_path_factory.mktemp("pacs")
    archive = build_pacs_archive(base / "archive")
    orthanc.clear()
    orthanc.upload(sorted(archive.rglob("*.dcm")))
    ckpt = make_checkpoint(base / "ckpt")
    ref = direct_scores(archive, ckpt)
    threshold = float(np.quantile(list(ref.values()), 0.8))
    calib = {"method": "fpr", "fpr": 0.2, "threshold": threshold, "n_normals": len(ref)}
    set_calibration(ckpt, {**calib, "split": "val", "data": "synthetic"})
    endpoint = Endpoint(
        orthanc.http_url + "/dicom-web", orthanc.user, orthanc.password, backoff_ms=50
    )
    return {"base": base, "archive": archive, "ckpt": ckpt, "endpoint": endpoint}


def _cfg(world: dict, out: Path, archive: Path | None = None) -> RunConfig:
    return RunConfig(
        archive=archive or out / "unused",
        out_dir=out,
        model_path=world["ckpt"],
        batch_size=4,
        rows_per_file=16,
    )


def test_qido_query_filters_by_date_and_modality_on_the_server(world) -> None:
    want = expected_series(world["archive"])

    def keys(query: Query) -> set[str]:
        return {h.key for h in query_series(world["endpoint"], query, page_size=2).hits}

    assert keys(Query()) == set(want)
    assert keys(Query(modality="CT")) == {k for k, (m, _) in want.items() if m == "CT"}
    since = date(2000, 1, 1)
    dated = {k for k, (_, d) in want.items() if d and d >= since.strftime("%Y%m%d")}
    assert dated and dated != set(want)
    assert any(d and d < since.strftime("%Y%m%d") for _, d in want.values())  # one dated before
    assert keys(Query(since=since)) == dated
    assert keys(Query(since=date(1990, 1, 1), modality="MR")) == {
        k for k, (m, d) in want.items() if m == "MR" and d
    }
    one = headers(world["archive"] / "mr")[0]
    listed = Query(study_uids=(str(one.StudyInstanceUID),))
    assert keys(listed) == {series_key(str(one.StudyInstanceUID), str(one.SeriesInstanceUID))}


@pytest.fixture(scope="module")
def folder_run(ray_local, world) -> pd.DataFrame:
    out = world["base"] / "folder"
    run_screen(_cfg(world, out, world["archive"]))
    return pq.read_table(out / "slices").to_pandas()


@pytest.fixture(scope="module")
def first_pacs_run(ray_local, world) -> dict:
    """A nightly first run (``--since last-run`` with no earlier run: everything), started
    after a killed run had fetched one series and left a half-written staging folder."""
    out = world["base"] / "nightly"
    hits = query_series(world["endpoint"], Query()).hits
    fetch_series(world["endpoint"], hits[:1], out)  # the part a killed run had finished
    junk = out / "_pacs" / "staging" / "half-written"
    junk.mkdir(parents=True)
    (junk / "x.dcm").write_bytes(b"partial")
    since, is_last = parse_since("last-run", out)
    assert since is None and is_last
    result = screen_pacs(_cfg(world, out), world["endpoint"], Query(since=since))
    return {"out": out, "result": result, "n_series": len(hits)}


def test_screen_from_dicomweb_equals_screen_from_the_same_files(folder_run, first_pacs_run):
    out, result = first_pacs_run["out"], first_pacs_run["result"]
    assert result.fetch.failed == {} and result.fetch.cached == 1
    assert result.fetch.fetched == first_pacs_run["n_series"] - 1
    assert result.screen.exit_code == 0
    pacs = pq.read_table(out / "slices").to_pandas()
    assert pacs["slice_key"].is_unique
    assert set(pacs["slice_key"]) == set(folder_run["slice_key"])
    a = folder_run.set_index("slice_key").sort_index()
    b = pacs.set_index("slice_key").loc[a.index]
    assert (a["series_key"] == b["series_key"]).all() and (a["study_key"] == b["study_key"]).all()
    np.testing.assert_allclose(b["score"], a["score"], rtol=1e-5, atol=1e-6)
    assert (a["flagged"] == b["flagged"]).all()
    assert b["flagged"].any()  # the export tests need flagged studies
    cache = out / "_pacs"
    assert cache.stat().st_mode & 0o777 == 0o700  # the fetched images are private
    modes = {p.relative_to(cache): (p.is_dir(), p.stat().st_mode & 0o777) for p in cache.rglob("*")}
    assert any(not d for d, _ in modes.values())
    wrong = {str(p): oct(m) for p, (d, m) in modes.items() if m != (0o700 if d else 0o600)}
    assert not wrong, wrong  # 0700 folders, 0600 files throughout (patient images)
    assert not (cache / "staging").exists()  # no leftovers of the killed run


def test_since_last_run_screens_only_a_study_uploaded_after_the_first_run(
    orthanc,  # noqa: F811
    world,
    first_pacs_run,
) -> None:
    out = first_pacs_run["out"]
    recorded = json.loads((out / "_pacs" / "query.json").read_text())
    assert recorded["series_found"] == first_pacs_run["n_series"]
    before = pq.read_table(out / "slices").to_pandas()
    today = datetime.now(timezone.utc).strftime("%Y%m%d")
    new = write_ct_series(world["base"] / "new", n_slices=4, rows=32, cols=32, seed=21)
    for f in new:
        ds = pydicom.dcmread(f)
        ds.StudyDate = today
        ds.save_as(f)
    orthanc.upload(new)
    since, _ = parse_since("last-run", out)
    assert since == (datetime.fromisoformat(recorded["last_query_utc"]) - timedelta(days=1)).date()
    result = screen_pacs(_cfg(world, out), world["endpoint"], Query(since=since))
    assert result.fetch.found == 1 and result.fetch.fetched == 1
    assert result.screen.manifest["series_screened_this_run"] == 1
    after = pq.read_table(out / "slices").to_pandas()
    new_key = series_key(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
    assert set(after["slice_key"]) - set(before["slice_key"]) == {
        k for k in after["slice_key"] if k.startswith(new_key)
    }
    assert after["slice_key"].is_unique and len(after) == len(before) + 4
    again = screen_pacs(_cfg(world, out), world["endpoint"], Query(since=since))
    assert again.fetch.fetched == 0 and again.screen.manifest["series_screened_this_run"] == 0


def test_a_pacs_that_stops_after_the_query_leaves_an_incomplete_run_a_rerun_finishes(
    ray_local, world, folder_run, tmp_path
) -> None:
    """Orthanc stopped between the query and the fetch: every series is a failed row, the run
    is ``incomplete`` with exit code 1 (also from ``summary``); once it is back, the same
    command finishes the run with the scores of a folder screen."""
    pacs_dir = tmp_path / "pacs"

    def endpoint_of(server) -> Endpoint:
        return Endpoint(server.http_url + "/dicom-web", server.user, server.password, 5.0, 2, 50)

    with orthanc_process(pacs_dir) as server:
        server.upload(sorted(world["archive"].rglob("*.dcm")))
        found = run_query(endpoint_of(server), Query())
        endpoint = endpoint_of(server)
    out = tmp_path / "run"
    down = screen_pacs(_cfg(world, out), endpoint, Query(), found=found)
    keys = {h.key for h in found.hits}
    assert set(down.fetch.failed) == keys and down.fetch.fetched == 0
    assert "connection refused by 127.0.0.1:" in next(iter(down.fetch.failed.values()))
    assert down.screen.status == "incomplete" and down.screen.exit_code == EXIT_INCOMPLETE
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["exit_code"] == EXIT_INCOMPLETE != 2  # 2: a usage error or a failed run
    assert manifest["series_failed"] == manifest["series_not_fetched"] == len(keys)
    errors = pq.read_table(out / "errors").to_pandas()
    assert set(errors["series_key"]) == keys and set(errors["status"]) == {"failed"}
    assert errors["reason"].str.contains("WADO-RS retrieve failed").all()
    summary = runner.invoke(app, ["summary", str(out)])
    assert summary.exit_code == EXIT_INCOMPLETE, summary.output
    assert "all inputs accounted for" not in summary.output
    assert not (out / "_pacs" / "query.json").exists()  # the next last-run asks again
    leaked = [u for u in identifiers(world["archive"]) if u in errors.to_csv() + summary.output]
    assert not leaked

    with orthanc_process(pacs_dir) as server:  # restarted (new port, same storage)
        back = screen_pacs(_cfg(world, out), endpoint_of(server), Query())
    assert back.fetch.failed == {} and back.fetch.fetched == len(keys)
    assert back.screen.status == "complete" and back.screen.exit_code == 0
    assert runner.invoke(app, ["summary", str(out)]).exit_code == 0
    pacs = pq.read_table(out / "slices").to_pandas().set_index("slice_key").sort_index()
    ref = folder_run.set_index("slice_key").sort_index()
    assert list(pacs.index) == list(ref.index)
    np.testing.assert_allclose(pacs["score"], ref["score"], rtol=1e-5, atol=1e-6)
    errors = pq.read_table(out / "errors").to_pandas()
    assert not errors["reason"].str.contains("WADO-RS").any()  # the failed rows are gone


def _cli_env(monkeypatch, orthanc, password: str | None = None) -> None:  # noqa: F811
    monkeypatch.setenv(USER_ENV, orthanc.user)
    monkeypatch.setenv(PASSWORD_ENV, password or orthanc.password)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.netrc of the machine


def test_a_series_the_server_fails_is_an_error_row_and_no_identifier_is_printed(
    ray_local,
    world,
    orthanc,  # noqa: F811
    monkeypatch,
    caplog,
    capfd,
) -> None:
    caplog.set_level(logging.DEBUG)
    _cli_env(monkeypatch, orthanc)
    ct = query_series(world["endpoint"], Query(modality="CT")).hits
    bad: SeriesHit = ct[0]
    out = world["base"] / "faulty"
    with FaultyProxy(orthanc.http_url, bad.series_uid) as proxy:
        args = ["screen", f"dicomweb+{proxy.url}/dicom-web", "--modality", "CT", "--out", str(out)]
        args += ["--model", str(world["ckpt"]), "--batch-size", "4"]
        result = runner.invoke(app, args)
    assert result.exit_code == EXIT_INCOMPLETE, result.output  # a series missing: not a success
    assert proxy.failed_requests == 4  # retried with backoff, then given up
    errors = pq.read_table(out / "errors").to_pandas()
    row = errors.set_index("series_key").loc[bad.key]
    assert row["status"] == "failed" and "HTTP 500" in row["reason"]
    scored = set(pq.read_table(out / "slices").to_pandas()["series_key"])
    assert scored == {h.key for h in ct} - {bad.key}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs_failed"] >= 1 and manifest["inputs_lost"] == 0
    assert manifest["status"] == "incomplete" and manifest["series_not_fetched"] == 1
    text = result.output + caplog.text + "".join(capfd.readouterr())
    text += errors.to_csv() + json.dumps(manifest)
    leaked = [s for s in identifiers(world["archive"]) if s in text]
    assert not leaked, f"{len(leaked)} identifiers printed or written"


def test_wrong_credentials_give_one_error_line_and_exit_2(world, orthanc, monkeypatch, tmp_path):  # noqa: F811
    _cli_env(monkeypatch, orthanc, password="wrong")
    out = tmp_path / "run"
    result = runner.invoke(app, ["screen", orthanc.dicomweb_url, "--out", str(out)])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "refused the credentials (HTTP 401)" in lines[0]
    assert "wrong" not in result.output


def test_doctor_says_whether_a_dicomweb_endpoint_answers(orthanc, monkeypatch) -> None:  # noqa: F811
    _cli_env(monkeypatch, orthanc)
    ok = runner.invoke(app, ["doctor", "--json", "--dicomweb", orthanc.dicomweb_url])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["dicomweb"]["answers"] is True
    assert json.loads(ok.output)["dicomweb"]["kind"] == "orthanc"  # as --pacs-kind auto finds
    said = runner.invoke(app, ["doctor", "--dicomweb", orthanc.dicomweb_url])
    assert "PACS kind: orthanc" in said.output, said.output
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    bad = runner.invoke(app, ["doctor", "--json", "--dicomweb", orthanc.dicomweb_url])
    assert bad.exit_code == 1
    report = json.loads(bad.output)["dicomweb"]
    assert report["answers"] is False and "HTTP 401" in report["note"]


def _study_documents(client, study_uid: str) -> dict[str, list[str]]:
    """Modality -> SOP Instance UIDs of one study on the PACS."""
    out: dict[str, list[str]] = {}
    for item in client.search_for_instances(study_instance_uid=study_uid):
        series = client.search_for_series(
            study_instance_uid=study_uid,
            search_filters={"SeriesInstanceUID": item["0020000E"]["Value"][0]},
        )
        modality = series[0]["00080060"]["Value"][0]
        out.setdefault(modality, []).append(item["00080018"]["Value"][0])
    return out


def _series_uid(client, study_uid: str, modality: str) -> str:
    found = client.search_for_series(
        study_instance_uid=study_uid, search_filters={"Modality": modality}
    )
    assert len(found) == 1
    return found[0]["0020000E"]["Value"][0]


def _sr_items(ds) -> dict[str, list]:
    """Concept meaning -> values (text, number, or referenced SOP UIDs) of an SR tree."""
    out: dict[str, list] = {}
    for item in ds.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "TEXT":
            out.setdefault(name, []).append(item.TextValue)
        elif item.ValueType == "NUM":
            value = float(item.MeasuredValueSequence[0].NumericValue)
            refs = [
                c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                for c in getattr(item, "ContentSequence", [])
            ]
            out.setdefault(name, []).append((value, refs))
    return out


def test_export_stores_an_sr_and_a_kos_in_each_flagged_study_and_reexport_replaces_them(
    world,
    orthanc,  # noqa: F811
    first_pacs_run,
    monkeypatch,
) -> None:
    from pdd_batch.ingest.dicomweb import cache_relative_path
    from pdd_batch.ingest.keys import file_key, study_key

    _cli_env(monkeypatch, orthanc)
    out = first_pacs_run["out"]
    client = make_client(world["endpoint"])
    studies = {
        study_key(s["0020000D"]["Value"][0]): s["0020000D"]["Value"][0]
        for s in client.search_for_studies()
    }
    table = pq.read_table(out / "studies").to_pandas()
    flagged = table[table["decision"] == "flagged"]
    assert len(flagged) >= 1
    slices = pq.read_table(out / "slices").to_pandas()
    manifest = json.loads((out / "manifest.json").read_text())
    before = {k: _study_documents(client, studies[k]) for k in flagged["study_key"]}

    for attempt in range(2):  # the second export replaces the documents of the first
        args = ["export", str(out), "--to", orthanc.dicomweb_url, "--secondary-capture"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        n = len(flagged)
        said = f"in {n} studies" if n != 1 else "in 1 study"
        assert re.search(rf"{said}\b", result.output), result.output
        leaked = [s for s in identifiers(world["archive"]) if s in result.output]
        assert not leaked
        for key in flagged["study_key"]:
            docs = _study_documents(client, studies[key])
            assert len(docs["SR"]) == 1 and len(docs["KO"]) == 1, attempt
            images = {m: v for m, v in docs.items() if m not in ("SR", "KO", "OT")}
            assert images == before[key]  # the original images untouched
            by_key = {
                file_key(cache_relative_path(s, sop)): sop
                for s in set(slices["series_key"])
                for v in images.values()
                for sop in v
            }
            rows = slices[(slices["study_key"] == key) & slices["flagged"]]
            pairs = zip(rows["file_key"], rows["score"], strict=True)
            want = {by_key[f]: score for f, score in pairs}
            sr_series = _series_uid(client, studies[key], "SR")
            sr = client.retrieve_instance(studies[key], sr_series, docs["SR"][0])
            items = _sr_items(sr)
            assert items["Model id"] == [manifest["model_id"]]
            assert items["Checkpoint hash"] == [manifest["checkpoint_hash"]]
            assert items["Study outcome"] == ["flagged"]
            assert items["Decision threshold"][0][0] == pytest.approx(manifest["threshold"])
            got = {refs[0]: value for value, refs in items["Slice anomaly score"]}
            assert got.keys() == want.keys()
            for sop, score in want.items():
                assert got[sop] == pytest.approx(score, rel=1e-5)
            kos_series = _series_uid(client, studies[key], "KO")
            kos = client.retrieve_instance(studies[key], kos_series, docs["KO"][0])
            kos_refs = {
                item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                for item in kos.ContentSequence
                if item.ValueType == "IMAGE"
            }
            assert kos_refs == set(want)
            assert len(docs["OT"]) == len(want)  # one overlay per flagged slice, never twice
            sc_series = _series_uid(client, studies[key], "OT")
            sc = client.retrieve_instance(studies[key], sc_series, docs["OT"][0])
            assert sc.BurnedInAnnotation == "YES" and "DERIVED" in sc.ImageType
            assert sc.pixel_array.ndim == 3 and sc.pixel_array.shape[2] == 3


def test_a_series_that_times_out_is_a_failed_fetch_with_nothing_left_behind(
    world,
    orthanc,  # noqa: F811
    tmp_path,
) -> None:
    from jobs.dicomweb_fetch import fetch_one

    hit = query_series(world["endpoint"], Query(modality="CT")).hits[0]
    series_root, staging = tmp_path / "series", tmp_path / "staging"
    series_root.mkdir()
    staging.mkdir()
    with FaultyProxy(orthanc.http_url, hit.series_uid, hang_s=3.0) as proxy:
        slow = Endpoint(proxy.url + "/dicom-web", orthanc.user, orthanc.password, 1.0, 2, 50)
        outcome = fetch_one(slow, hit, series_root, staging)
    assert outcome.key == hit.key and outcome.n_instances == 0
    assert outcome.error == "WADO-RS retrieve failed (ReadTimeout)"
    assert proxy.failed_requests == 2  # the retry, then given up
    assert not any(series_root.iterdir()) and not any(staging.iterdir())
    assert hit.series_uid not in repr(outcome)


def test_a_screen_after_the_export_leaves_the_products_own_series_out(
    ray_local,
    world,
    orthanc,  # noqa: F811
    first_pacs_run,
    monkeypatch,
) -> None:
    _cli_env(monkeypatch, orthanc)
    out = first_pacs_run["out"]
    args = ["export", str(out), "--to", orthanc.dicomweb_url, "--secondary-capture"]
    assert runner.invoke(app, args).exit_code == 0  # an SR, a KOS and overlays on the PACS
    found = run_query(world["endpoint"], Query())
    assert found.own_skipped >= 3
    assert not {h.modality for h in found.hits} & {"SR", "KO", "OT"}
    again = screen_pacs(_cfg(world, out), world["endpoint"], Query())
    assert again.fetch.failed == {} and again.fetch.fetched == 0
    assert again.screen.status == "complete" and again.screen.exit_code == 0


def test_a_first_since_last_run_says_how_many_studies_and_wants_a_date_or_all(
    ray_local,
    world,
    orthanc,  # noqa: F811
    monkeypatch,
    tmp_path,
) -> None:
    _cli_env(monkeypatch, orthanc)
    out = tmp_path / "nightly"
    base = ["screen", orthanc.dicomweb_url, "--since", "last-run", "--out", str(out)]
    base += ["--model", str(world["ckpt"]), "--modality", "MR"]
    n_studies = run_query(world["endpoint"], Query(modality="MR")).n_studies
    refused = runner.invoke(app, base)
    assert refused.exit_code == 2, refused.output
    assert f"would fetch all {n_studies} studies" in refused.output
    assert "--since YYYY-MM-DD" in refused.output and "--all" in refused.output
    assert not (out / "_pacs").exists() and not (out / "manifest.json").exists()
    done = runner.invoke(app, [*base, "--all", "--batch-size", "4"])
    assert done.exit_code == 0, done.output
    assert json.loads((out / "_pacs" / "query.json").read_text())["series_found"] >= 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pacs"]["cursor"] == "none"  # everything: no earlier run to reach back from
    again = runner.invoke(app, [*base, "--batch-size", "4"])  # a recorded run: no question
    assert again.exit_code == 0, again.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pacs"]["cursor"] == "orthanc-changes"  # the first run recorded Last


def _wait_stable(orthanc, since: int) -> None:  # noqa: F811
    """Until Orthanc logs a StableStudy after ``since`` (StableAge is 1 s in the test config)."""
    import time

    with orthanc.session() as s:
        for _ in range(120):
            page = s.get(f"{orthanc.http_url}/changes", params={"since": since}, timeout=10).json()
            if any(c["ChangeType"] == "StableStudy" for c in page["Changes"]):
                return
            time.sleep(0.25)
    raise AssertionError("Orthanc logged no StableStudy")


def test_last_run_screens_a_study_received_late_with_an_old_study_date(
    ray_local,
    world,
    orthanc,  # noqa: F811
    monkeypatch,
    tmp_path,
) -> None:
    _cli_env(monkeypatch, orthanc)
    out = tmp_path / "received"
    common = ["--modality", "CT", "--out", str(out), "--model", str(world["ckpt"])]
    common += ["--batch-size", "4"]
    first = runner.invoke(app, ["screen", orthanc.dicomweb_url, "--since", "2024-02-29", *common])
    assert first.exit_code == 0, first.output
    recorded = json.loads((out / "_pacs" / "query.json").read_text())
    assert isinstance(recorded["orthanc_changes_last"], int)
    late = write_ct_series(tmp_path / "late", n_slices=4, rows=32, cols=32, seed=31)
    for f in late:
        ds = pydicom.dcmread(f)
        ds.StudyDate = "20010102"  # acquired long ago, received now
        ds.save_as(f)
    orthanc.upload(late)
    _wait_stable(orthanc, recorded["orthanc_changes_last"])
    second = runner.invoke(app, ["screen", orthanc.dicomweb_url, "--since", "last-run", *common])
    assert second.exit_code == 0, second.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["series_screened_this_run"] == 1
    late_key = series_key(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
    assert late_key in set(pq.read_table(out / "slices").to_pandas()["series_key"])
    after = json.loads((out / "_pacs" / "query.json").read_text())
    assert after["orthanc_changes_last"] > recorded["orthanc_changes_last"]
    assert after["earliest_since"] <= "2001-01-02"  # the export finds the late study again


def _dated_series(root: Path, seed: int, study_date: date, modality: str = "CT") -> str:
    """A synthetic series with its StudyDate; returns its series key."""
    files = write_ct_series(root, n_slices=4, rows=32, cols=32, modality=modality, seed=seed,
                            study_date=study_date.strftime("%Y%m%d"))  # fmt: skip
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return series_key(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))


def test_generic_last_run_rereads_a_lookback_window_and_says_which_cursor_it_used(
    ray_local,
    world,
    orthanc,  # noqa: F811
    monkeypatch,
    tmp_path,
) -> None:
    """``--pacs-kind generic``: Orthanc's change log is not used; ``--since last-run`` asks
    for StudyDate from 7 days before the previous query, so a study dated 3 days earlier and
    sent after the first run is screened, one dated 30 days earlier is not, and the manifest
    and the summary say which cursor was used and what it misses."""
    _cli_env(monkeypatch, orthanc)
    out = tmp_path / "generic"
    common = ["--modality", "CT", "--out", str(out), "--model", str(world["ckpt"])]
    common += ["--batch-size", "4", "--pacs-kind", "generic"]
    today = datetime.now(timezone.utc).date()
    first = runner.invoke(app, ["screen", orthanc.dicomweb_url, "--since", str(today), *common])
    assert first.exit_code == 0, first.output
    recorded = json.loads((out / "_pacs" / "query.json").read_text())
    assert recorded["pacs_kind"] == "generic" and recorded["orthanc_changes_last"] is None
    inside = _dated_series(tmp_path / "inside", 51, today - timedelta(days=3))
    outside = _dated_series(tmp_path / "outside", 52, today - timedelta(days=30))
    uploaded = sorted((tmp_path / "inside").glob("*.dcm")) + sorted(
        (tmp_path / "outside").glob("*.dcm")
    )
    orthanc.upload(uploaded)
    second = runner.invoke(app, ["screen", orthanc.dicomweb_url, "--since", "last-run", *common])
    assert second.exit_code == 0, second.output
    manifest = json.loads((out / "manifest.json").read_text())
    pacs = manifest["pacs"]
    assert (pacs["server_kind"], pacs["kind_from"]) == ("generic", "option")
    assert pacs["cursor"] == "studydate-window" and pacs["lookback_days"] == 7
    assert pacs["studies_cursor"] == 0 and "sent late is missed" in pacs["limits"]
    screened = set(pq.read_table(out / "slices").to_pandas()["series_key"])
    assert inside in screened and outside not in screened
    summary = runner.invoke(app, ["summary", str(out)])
    said = " ".join(summary.output.replace("│", " ").split())  # the panel wraps long lines
    assert "cursor studydate-window: StudyDate from 7 days before" in said
    assert "sent late is missed" in said
    assert "cursor studydate-window" in " ".join(second.output.replace("│", " ").split())
    leaked = [u for u in identifiers(tmp_path / "inside") | identifiers(tmp_path / "outside")
              if u in second.output + summary.output + json.dumps(manifest)]  # fmt: skip
    assert not leaked


def test_a_study_named_by_the_change_log_and_found_by_the_window_is_fetched_once(
    ray_local,
    world,
    orthanc,  # noqa: F811
    monkeypatch,
    tmp_path,
) -> None:
    """Orthanc (probed): a study dated today and sent after the first run is in the StudyDate
    window and in the change log; it is queried and fetched once (counted in the manifest)."""
    _cli_env(monkeypatch, orthanc)
    out = tmp_path / "both"
    common = ["--modality", "MR", "--out", str(out), "--model", str(world["ckpt"])]
    common += ["--batch-size", "4"]
    today = datetime.now(timezone.utc).date()
    first = runner.invoke(app, ["screen", orthanc.dicomweb_url, "--since", str(today), *common])
    assert first.exit_code == 0, first.output
    recorded = json.loads((out / "_pacs" / "query.json").read_text())
    assert recorded["pacs_kind"] == "orthanc"
    new_key = _dated_series(tmp_path / "new", 61, today, modality="MR")
    orthanc.upload(sorted((tmp_path / "new").glob("*.dcm")))
    _wait_stable(orthanc, recorded["orthanc_changes_last"])
    second = runner.invoke(app, ["screen", orthanc.dicomweb_url, "--since", "last-run", *common])
    assert second.exit_code == 0, second.output
    manifest = json.loads((out / "manifest.json").read_text())
    pacs = manifest["pacs"]
    assert (pacs["server_kind"], pacs["kind_from"], pacs["cursor"]) == (
        "orthanc",
        "probe",
        "orthanc-changes",
    )
    assert pacs["lookback_days"] == 1 and pacs["studies_both"] == 1
    assert pacs["studies_cursor"] >= 1  # other tests' CT studies may be logged too
    assert pacs["series_found"] == pacs["series_fetched"] == 1  # once, not once per part
    assert manifest["series_screened_this_run"] == 1
    assert new_key in set(pq.read_table(out / "slices").to_pandas()["series_key"])
