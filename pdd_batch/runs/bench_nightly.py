"""`pdd-batch bench nightly`: what one more night costs as a run folder's history grows.

Synthetic (no model, no Ray): for each size it builds a run folder whose store records that
many series with their rows (Parquet files of ``ROWS_PER_SERIES`` slices each, their heatmaps
and study rollups; bulk inserts), then times what a nightly run pays per new series: one
series commit (part files written + one transaction, as ``SliceSink`` does) and the end-of-run
publish (slices live + rollup of the touched studies) after ``NEW_SERIES`` new series. The
last line is ``nightly cost ratio 1e6/1e3: X.XX`` of (commit + publish / NEW_SERIES) between
the largest and the smallest store. Optionally it also times a second discovery of an
unchanged archive of many small DICOM files against the first (``discovery_files``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pdd_batch.runs import live, store
from pdd_batch.runs.bench_discovery import time_discovery
from pdd_batch.runs.schema import SCHEMA_VERSION, SLICES_SCHEMA, STUDIES_SCHEMA
from pdd_batch.runs.state import RunState, SeriesRecord
from pdd_batch.runs.tables import write_studies
from pdd_batch.runs.writer import write_table_atomic

ROWS_PER_SERIES = 4
SERIES_PER_STUDY = 2
ROWS_PER_FILE = 1 << 16
NEW_SERIES = 100
COMMITS_TIMED = 20
SIZES = (1_000, 100_000, 1_000_000)


def _keys(prefix: str, numbers: np.ndarray) -> pa.Array:
    """``prefix`` + zero-padded ``numbers`` (vectorised: ``s00000042``)."""
    digits = pc.utf8_lpad(pc.cast(pa.array(numbers), pa.string()), 8, "0")
    return pc.binary_join_element_wise(prefix, digits, "")


def synthetic_rows(first: int, n_series: int, run_id: str = "bench") -> pa.Table:
    """``SLICES_SCHEMA`` rows of series ``first .. first + n_series - 1`` (vectorised)."""
    idx = np.repeat(np.arange(first, first + n_series), ROWS_PER_SERIES)
    sl = np.tile(np.arange(ROWS_PER_SERIES, dtype=np.int32), n_series)
    series = _keys("s", idx)
    study = _keys("t", idx // SERIES_PER_STUDY)
    n = len(idx)
    rng = np.random.default_rng(first)

    def const(value: object, typ: pa.DataType) -> pa.Array:
        return pa.array([value] * n, typ) if n < 1024 else pa.repeat(pa.scalar(value, typ), n)

    cols = {
        "schema_version": const(SCHEMA_VERSION, pa.string()),
        "slice_key": pc.binary_join_element_wise(series, pc.cast(pa.array(sl), pa.string()), ":0:"),
        "study_key": study,
        "series_key": series,
        "volume_index": pa.array(np.zeros(n, np.int32)),
        "slice_index": pa.array(sl),
        "file_key": _keys("f", idx),
        "modality": const("CT", pa.string()),
        "score": pa.array(rng.random(n, dtype=np.float32)),
        "threshold": const(0.9, pa.float32()),
        "flagged": pa.array(np.zeros(n, bool)),
        "heatmap_png": const(b"\x89PNG" + bytes(60), pa.binary()),
        "heatmap_max": const(1.0, pa.float32()),
        "model_id": const("bench", pa.string()),
        "checkpoint_hash": const("h", pa.string()),
        "preprocessing": const("{}", pa.string()),
        "run_id": const(run_id, pa.string()),
        "code_version": const("0", pa.string()),
        "ood_distance": pa.nulls(n, pa.float32()),
        "out_of_distribution": pa.nulls(n, pa.bool_()),
    }
    return pa.Table.from_pydict(cols, schema=SLICES_SCHEMA)


def build_store(out: Path, n_series: int) -> RunState:
    """A published run folder recording ``n_series`` series (bulk: files written directly,
    one transaction of ``executemany`` inserts)."""
    state = RunState.load(out)
    state.bind_model("h", "bench", force=False)
    state.bind_threshold(0.9)
    per_file = ROWS_PER_FILE // ROWS_PER_SERIES
    series_rows, file_rows, study_tables = [], [], []
    for k, first in enumerate(range(0, n_series, per_file)):
        count = min(per_file, n_series - first)
        table = synthetic_rows(first, count)
        name = f"slices-build-{k:05d}.parquet"
        write_table_atomic(table.drop_columns(["heatmap_png"]), out / "slices" / name)
        heat = table.select(["schema_version", "slice_key", "series_key", "heatmap_png"])
        write_table_atomic(heat, out / "heatmaps" / name)
        n = table.num_rows
        file_rows += [(name, tbl, "live", n, n) for tbl in ("slices", "heatmaps")]
        for i in range(first, first + count):
            study = f"t{i // SERIES_PER_STUDY:08d}"
            series_rows.append((f"s{i:08d}", name, name, ROWS_PER_SERIES, "fp", study, "[]"))
        study_tables.append(_rollup(table))
    _insert(state, series_rows, file_rows, study_tables)
    return state


def _rollup(table: pa.Table) -> pa.Table:
    """Study rows of ``table`` (vectorised; the values only need to be well-formed)."""
    agg = table.group_by("study_key").aggregate(
        [("score", "max"), ("score", "mean"), ("series_key", "count_distinct"), ("score", "count")]
    )
    n = agg.num_rows

    def const(value: object, typ: pa.DataType) -> pa.Array:
        return pa.repeat(pa.scalar(value, typ), n)

    cols = {
        "schema_version": const(SCHEMA_VERSION, pa.string()),
        "study_key": agg["study_key"],
        "n_series": agg["series_key_count_distinct"].cast(pa.int32()),
        "n_slices": agg["score_count"].cast(pa.int32()),
        "max_score": agg["score_max"],
        "topk_mean": agg["score_mean"].cast(pa.float32()),
        "n_flagged": const(0, pa.int32()),
        "decision": const("normal", pa.string()),
        "top_slice_key": pa.nulls(n, pa.string()),
        "modality": const("CT", pa.string()),
        "model_id": const("bench", pa.string()),
        "checkpoint_hash": const("h", pa.string()),
        "run_id": const("build", pa.string()),
    }
    return pa.Table.from_pydict(
        {f.name: cols[f.name] for f in STUDIES_SCHEMA if f.name in cols},
        schema=pa.schema([f for f in STUDIES_SCHEMA if f.name in cols]),
    )


def _insert(state: RunState, series_rows: list, file_rows: list, studies: list[pa.Table]) -> None:
    studies_table = pa.concat_tables(studies)
    name = "studies-build.parquet"
    write_table_atomic(studies_table, state.out_dir / "studies" / name)
    keys = studies_table.column("study_key").to_pylist()
    with store.transaction(state.conn) as c:
        c.executemany("INSERT INTO series VALUES (?, ?, ?, ?, ?, ?, ?)", series_rows)
        c.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?)", file_rows)
        c.execute(
            "INSERT INTO files VALUES (?, 'studies', 'live', ?, ?)", (name, len(keys), len(keys))
        )
        c.executemany("INSERT INTO studies VALUES (?, ?)", [(k, name) for k in keys])
        store.set_meta(c, published={"run_id": "build", "n_series": len(series_rows)})
    live.write_live_list(state)


def _commit(state: RunState, index: int, run_id: str) -> float:
    """Commit one new series as the sink does; returns the seconds it took."""
    table = synthetic_rows(index, 1, run_id)
    part = f"part-{run_id}-{index:08d}.parquet"
    study = f"t{index // SERIES_PER_STUDY:08d}"
    t = time.perf_counter()
    state.write_part(part, table)
    state.commit_part(part, {f"s{index:08d}": SeriesRecord(part, ROWS_PER_SERIES, "fp", study)})
    return time.perf_counter() - t


def time_night(state: RunState, first: int, run_id: str) -> tuple[float, float]:
    """(median seconds of one series commit, seconds of the publish) for ``NEW_SERIES`` new
    series numbered from ``first``."""
    commits = [_commit(state, first + i, run_id) for i in range(NEW_SERIES)]
    t = time.perf_counter()
    state.publish(run_id)
    write_studies(state, topk=5, run_id=run_id)
    publish_s = time.perf_counter() - t
    return statistics.median(commits), publish_s


def _time_stores(
    stores: dict[int, RunState], rounds: int, figures: dict[str, float], print_fn: Callable
) -> None:
    """Nights on every store in turn, ``rounds`` times (the machine's load drifts alike over
    all sizes); the median of each size's nights."""
    nights: dict[int, list[tuple[float, float]]] = {n: [] for n in stores}
    for r in range(rounds):
        for n, state in stores.items():
            nights[n].append(time_night(state, n + r * NEW_SERIES, f"night{r}"))
    for n, got in nights.items():
        commit_s = statistics.median(c for c, _ in got)
        publish_s = statistics.median(p for _, p in got)
        per_series = commit_s + publish_s / NEW_SERIES
        figures[f"commit_s_{n}"], figures[f"publish_s_{n}"] = commit_s, publish_s
        figures[f"per_series_s_{n}"] = per_series
        print_fn(
            f"store of {n:>9,} series: one series commit {commit_s * 1e3:7.2f} ms; publish "
            f"after {NEW_SERIES} new series {publish_s * 1e3:8.1f} ms; per new series "
            f"{per_series * 1e3:7.2f} ms (median of {rounds} nights)"
        )


def run_nightly_benchmark(
    print_fn: Callable[[str], None] = print,
    sizes: tuple[int, ...] = SIZES,
    discovery_files: int = 100_000,
    rounds: int = 3,
    workdir: Path | None = None,
) -> dict[str, float]:
    """Print the figures (see the module docstring); returns them by name."""
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-nightly-") as tmp:
        stores = {}
        for n in sizes:
            t = time.perf_counter()
            stores[n] = build_store(Path(tmp) / f"run-{n}", n)
            print_fn(f"store of {n:>9,} series built in {time.perf_counter() - t:6.1f} s")
        _time_stores(stores, rounds, figures, print_fn)
        for state in stores.values():
            state.close()
        if discovery_files:
            figures.update(time_discovery(Path(tmp) / "archive", discovery_files, print_fn))
    small, large = min(sizes), max(sizes)
    ratio = figures[f"per_series_s_{large}"] / figures[f"per_series_s_{small}"]
    figures["ratio"] = ratio
    print_fn(f"nightly cost ratio {_label(large)}/{_label(small)}: {ratio:.2f}")
    return figures


def _label(n: int) -> str:
    """1000 -> 1e3."""
    return f"1e{len(str(n)) - 1}" if str(n).strip("0") == "1" else str(n)
