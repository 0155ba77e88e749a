"""The retraining flow: download -> validate -> normalize and cache (-> train -> evaluate -> register)."""

from __future__ import annotations

from prefect import flow

from flows.params import RetrainParams
from fmnist.cache import CachedDataset
from tasks.download import download_task
from tasks.incoming import collect_incoming_task
from tasks.normalize import normalize_task
from tasks.validate import validate_task


@flow(name="retrain-fashion-mnist")
def retrain(params: RetrainParams = RetrainParams()) -> CachedDataset:
    layout = params.layout
    raw = download_task(
        spec=params.dataset,
        mirrors=params.mirrors,
        raw_dir=layout.raw,
        timeout_s=params.download_timeout_s,
        retries=params.download_retries,
    )
    incoming = collect_incoming_task(incoming_dir=params.incoming_path)
    validation = validate_task(spec=params.dataset, raw=raw, incoming=incoming, validation_dir=layout.validation)
    return normalize_task(
        spec=params.dataset,
        raw=raw,
        incoming=incoming,
        validation=validation,
        cache_dir=layout.cache,
        validation_dir=layout.validation,
    )


if __name__ == "__main__":
    cached = retrain()
    print(f"Training data: {cached.train.path} ({cached.train.rows:,} rows)")
    print(f"Test data:     {cached.test.path} ({cached.test.rows:,} rows)")
