"""The record types of the run store (a leaf module: imports only the schema)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pdd_batch.runs.schema import SLICES_SCHEMA


class RunStateError(RuntimeError):
    """A run store that cannot be read or does not match the run folder."""


@dataclass(frozen=True)
class SeriesRecord:
    """One screened series.

    Attributes:
        part: the slices file holding its rows (a store part or a live file), or "" (no rows).
        n_slices: rows it contributed.
        fingerprint: digest of its input files (paths, sizes, mtimes) when it was screened.
        study_key: its study (for rollups without reading every part).
        dropped: ``[file key, reason]`` for each of its files that gave no slice.
    """

    part: str
    n_slices: int
    fingerprint: str
    study_key: str
    dropped: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SeriesRecord:
        dropped = d.get("dropped", ())
        if isinstance(dropped, str):
            dropped = json.loads(dropped)
        return cls(
            part=str(d["part"]),
            n_slices=int(d["n_slices"]),
            fingerprint=str(d["fingerprint"]),
            study_key=str(d["study_key"]),
            dropped=tuple((str(f), str(r)) for f, r in dropped),
        )

    def dropped_json(self) -> str:
        """``dropped`` as stored (a JSON list of pairs)."""
        return json.dumps([list(p) for p in self.dropped])


def conform_slices(table: pa.Table, schema: pa.Schema = SLICES_SCHEMA) -> pa.Table:
    """``table`` with exactly the columns of ``schema`` (absent nullable columns become nulls)."""
    columns = []
    for f in schema:
        if f.name in table.column_names:
            columns.append(table.column(f.name).cast(f.type))
        elif f.nullable:
            columns.append(pa.nulls(table.num_rows, type=f.type))
        else:
            raise RunStateError(
                f"earlier rows lack the column {f.name!r}: rescreen with --force to rewrite them"
            )
    return pa.Table.from_arrays(columns, schema=schema)
