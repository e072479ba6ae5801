"""Run outputs: Parquet schema, run state, writers, manifest, results."""
