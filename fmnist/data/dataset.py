"""Facts about Fashion-MNIST: class names, image size, the canonical files and their hashes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

IMAGE_SIZE = 28
NUM_CLASSES = 10
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Debian's dataset-fashion-mnist first: it is what works offline (here and in CI).
DEFAULT_MIRRORS = (
    "/usr/share/datasets/fashion-mnist/",
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)


def class_slug(name: str) -> str:
    """Folder-safe form of a class name: 'T-shirt/top' -> 't-shirt-top', 'Ankle boot' -> 'ankle-boot'."""
    return name.lower().replace("/", "-").replace(" ", "-").replace("_", "-")


CLASS_SLUGS = tuple(class_slug(name) for name in CLASS_NAMES)


class RemoteFile(BaseModel):
    """One gzip-compressed IDX file as mirrors serve it, pinned by its decompressed content."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # A plain file name: it is joined to each mirror's URL and, less `.gz`, to the raw folder.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.gz$", description="File name on the mirror")
    raw_size: int = Field(gt=0, le=1 << 32, description="Bytes after decompression")
    # Of the decompressed bytes: mirrors recompress the same content differently.
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @property
    def raw_name(self) -> str:
        return self.name.removesuffix(".gz")


class DatasetSpec(BaseModel):
    """The four files of an image/label dataset and the row counts they must hold."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    train_images: RemoteFile
    train_labels: RemoteFile
    test_images: RemoteFile
    test_labels: RemoteFile
    train_rows: int = Field(gt=0, le=10_000_000)
    test_rows: int = Field(gt=0, le=10_000_000)

    @property
    def files(self) -> tuple[RemoteFile, ...]:
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)


FASHION_MNIST = DatasetSpec(
    train_images=RemoteFile(
        name="train-images-idx3-ubyte.gz",
        raw_size=47_040_016,
        sha256="c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    train_labels=RemoteFile(
        name="train-labels-idx1-ubyte.gz",
        raw_size=60_008,
        sha256="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    test_images=RemoteFile(
        name="t10k-images-idx3-ubyte.gz",
        raw_size=7_840_016,
        sha256="5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    test_labels=RemoteFile(
        name="t10k-labels-idx1-ubyte.gz",
        raw_size=10_008,
        sha256="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
    train_rows=60_000,
    test_rows=10_000,
)
