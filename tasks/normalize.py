"""Normalize stage, as a Prefect task: the parquet cache of normalized data (`fmnist.data.normalization`)
and an artifact naming its files."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from fmnist.data.cache import CachedDataset
from fmnist.data.dataset import DatasetSpec
from fmnist.data.download import RawDataset
from fmnist.data.incoming import IncomingBatch
from fmnist.data.normalization import normalize_and_cache
from fmnist.data.validation import ValidationReport
from fmnist.storage.layout import StorageParams


@task(name="normalize")
def normalize_task(
    spec: DatasetSpec,
    raw: RawDataset,
    incoming: list[IncomingBatch],
    validation: ValidationReport,
    storage: StorageParams,
) -> CachedDataset:
    logger = get_run_logger()
    cached = normalize_and_cache(spec, raw, incoming, validation, storage.store(), storage.data, logger)
    logger.info(
        "Parquet cache %s %s: %d train rows in %d parts, %d test rows",
        cached.key[:16],
        "reused" if cached.reused else "written",
        cached.train_rows,
        len(cached.train),
        cached.test.rows,
    )
    sources = ["canonical train", *(f"batch {name}" for name in cached.sources.get("incoming", {}))]
    create_markdown_artifact(
        key="data-cache",
        markdown=(
            f"# Normalized data {'(reused)' if cached.reused else '(written)'}\n\n"
            f"Key `{cached.key}`\n\n| part | rows | file | sha256 |\n| --- | ---: | --- | --- |\n"
            + "\n".join(
                f"| {name} | {part.rows:,} | `{part.path}` | `{part.sha256[:16]}` |"
                for name, part in [*zip(sources, cached.train, strict=True), ("canonical test", cached.test)]
            )
        ),
        description="The parquet parts training reads",
    )
    return cached
