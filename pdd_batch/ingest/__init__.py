"""Ingestion: archive discovery, DICOM/NIfTI readers, slicing and windowing."""
