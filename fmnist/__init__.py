"""Building blocks shared by the pipeline's tasks: data facts, file formats, the parquet cache.

Nothing here imports Prefect, GX or TensorFlow, so every piece is testable and cheap to import.
"""
