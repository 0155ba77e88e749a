"""Memory that does not grow with the dataset: the data stages hold one source at a time, training holds
the pixels once, as uint8.

Each scenario runs in a fresh interpreter that reports its peak RSS growth after its imports. A
dataset of 1 and of 8 incoming batches (6,000 images each) are compared: the 7 extra batches are
126 MiB of float32 pixels and 31 MiB of uint8. Before parts, the data stages held the whole training
set as float32 (and its summaries), and training held it as float32 too: both grew by more than the
ceilings below (`bench/scale.py` measures the same at 6 million images).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, balanced_labels, synthetic_images, write_idx_batch, write_mirror

BATCH_IMAGES = 6_000
EXTRA_BATCHES = 7
EXTRA_FLOAT32_MB = EXTRA_BATCHES * BATCH_IMAGES * 784 * 4 / 2**20
EXTRA_UINT8_MB = EXTRA_FLOAT32_MB / 4
# What the data stages may grow by for the 7 extra batches: half their float32 size. Measured: 44-48 MB,
# the allocator's arenas (the parquet writer's thread among them) settling over the first parts, then flat;
# before parts, the stages held the float32 training set whole, 126 MiB more.
DATA_CEILING_MB = EXTRA_FLOAT32_MB / 2
TRAINING_CEILING_MB = 2 * EXTRA_UINT8_MB + 20  # the uint8 pixels, and room for TensorFlow's own buffers

SCENARIO = """
import json, resource, sys, tempfile
from pathlib import Path
import great_expectations, pandas, pyarrow.parquet  # imported before the baseline: not the data's cost
from fmnist.data.dataset import DatasetSpec
from fmnist.data.download import download_dataset
from fmnist.data.incoming import known_images, screen_incoming
from fmnist.data.normalization import normalize_and_cache
from fmnist.data.validation import validate_raw
from fmnist.storage import Store
from fmnist.storage.layout import DataLayout, RunLayout

stage, mirror, spec, root = sys.argv[1], sys.argv[2], DatasetSpec.model_validate_json(sys.argv[3]), Path(sys.argv[4])
store, layout = Store(), DataLayout(str(root / "data"))
if stage == "train":
    import keras, tensorflow
    from fmnist.training.fit import train_model
    from fmnist.training.model import TrainParams
    from fmnist.training.run_folder import RunFolder
raw = download_dataset(spec, [mirror], store, layout.raw)
known = known_images(store, raw.test_images.file, raw.train_images.file)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
screening = screen_incoming(store, str(root / "incoming"), known, receipts=layout.screened, outcomes=layout.outcomes)
batches = screening.batches
report = validate_raw(spec, raw, batches, store, layout.validation)
cached = normalize_and_cache(spec, raw, batches, report, store, layout)
assert report.success
if stage == "train":
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as run:
        train_model(cached, TrainParams(epochs=1), RunFolder(store, RunLayout(run)))
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"growth_mb": growth, "images": cached.train_rows}))
"""


def peak_growth_mb(stage: str, mirror: Path, spec, root: Path) -> tuple[float, int]:
    done = subprocess.run(
        [sys.executable, "-c", SCENARIO, stage, str(mirror), spec.model_dump_json(), str(root)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["growth_mb"], result["images"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory):
    """A small canonical mirror; a root whose incoming folder holds one batch, and one holding eight."""
    base = tmp_path_factory.mktemp("memory")
    spec = write_mirror(base / "mirror", train_per_class=20, test_per_class=5)
    roots = {}
    for count in (1, 1 + EXTRA_BATCHES):
        root = base / f"{count}-batches"
        for number in range(count):
            labels = balanced_labels(BATCH_IMAGES // 10, seed=100 + number)
            write_idx_batch(root / "incoming" / f"batch-{number}", synthetic_images(labels, seed=100 + number), labels)
        roots[count] = root
    return base / "mirror", spec, roots


def test_the_data_stages_memory_does_not_grow_with_the_number_of_batches(datasets) -> None:
    mirror, spec, roots = datasets
    (few, few_images), (many, many_images) = (peak_growth_mb("data", mirror, spec, roots[n]) for n in sorted(roots))
    assert many_images - few_images == EXTRA_BATCHES * BATCH_IMAGES
    assert many - few < DATA_CEILING_MB, (
        f"the data stages grew {many - few:.0f} MB more for {EXTRA_BATCHES} more batches "
        f"({EXTRA_FLOAT32_MB:.0f} MB as float32): they hold more than one batch at a time"
    )


@pytest.mark.training
def test_training_holds_the_pixels_once_as_uint8(datasets) -> None:
    mirror, spec, roots = datasets
    (few, _), (many, _) = (peak_growth_mb("train", mirror, spec, roots[n]) for n in sorted(roots))
    assert many - few < TRAINING_CEILING_MB, (
        f"training grew {many - few:.0f} MB more for {EXTRA_UINT8_MB:.0f} MB more uint8 pixels "
        f"({EXTRA_FLOAT32_MB:.0f} MB as float32)"
    )
