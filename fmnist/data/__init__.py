"""The data stages' plain code: download, collect incoming batches, validate, normalize and cache."""
