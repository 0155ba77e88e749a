"""One module per pipeline stage: plain functions that do the work, and a thin Prefect task."""
