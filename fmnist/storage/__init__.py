"""Where the pipeline keeps things, and every guarantee it makes about them.

A location is a local path or an `s3://bucket/key` URL. One `Store` (`fmnist.storage.store`) reads and
writes both, each through its backend (`fmnist.storage.local`, `fmnist.storage.s3`, one protocol in
`fmnist.storage.base`); nothing else in the pipeline opens a stored file or asks which backend holds
it. What every stage relies on, on local disk and on object storage alike:

- **Whole or absent.** A file is published in one step: on disk, a temp file beside it is fsynced and
  renamed into place; on S3, one PUT (or a completed multipart upload), which readers see whole or not
  at all. A folder (a cache entry, a validation result, a registry version, a checkpoint) is published
  by writing its marker file last: a folder without its marker does not exist for any reader.
- **Create-only.** `create` writes a file only if nothing is there yet: `os.link` of a finished temp
  file on disk, `If-None-Match: *` on S3. Registry version numbers, version manifests and the audit
  log are written this way, so two hosts never overwrite each other's work.
- **Compare-and-swap.** `replace` writes a file only if it still holds what the caller read (its
  etag): `If-Match` on S3; on disk, compare and rename under an flock of a sidecar lock file (local
  disks have locks; object stores do not, and need none). The champion pointer moves this way.
- **Stamps vouch for what they see.** A file's stamp (`FileStamp`, from one listing) changes whenever
  its content can have changed: on disk it holds the inode change time, which no user can set (`touch
  -d`, `cp -p` and `rsync -t` set the modification time back, not the change time); in a bucket the
  ETag and LastModified the server sets. A stamp is *settled* once its change time is `SETTLE_S` old:
  a later write in the same clock tick (coarse file systems) cannot leave it the same. What a stamp
  keys (a screening receipt, a cache part's manifest) is trusted only while it is settled; an
  unsettled one is checked by hash.
- **Verified reads.** Content is asked for by its sha256: `local_copy` returns a local file that hashes
  to it, or raises. Copies of remote objects are kept in a scratch folder named by their hash, reused
  across runs and re-hashed before every use.
- **Secrets stay out.** Credentials and the endpoint come from the standard AWS chain
  (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `AWS_REGION`, or a profile); a
  location with credentials in it is refused, so none reaches a parameter, a record or a log line.
- **Names are literal.** `*`, `?`, `[` in a name are characters, on every backend: listing, copying,
  moving and deleting never expand a pattern (fsspec's `copy`, `mv`, `rm` and `expand_path` glob on S3,
  so they are not used). A name read from a record or a key is resolved with `inside`, which refuses
  one that would land outside its folder.
- **Lost acknowledgements.** A create-only or compare-and-swap PUT whose answer was lost may have
  landed: its retry (botocore's, or aiohttp's own, unseen, on a dropped connection) then meets the
  writer's own write and gets 412. So a conditional write that fails against exactly the bytes it meant
  to write has succeeded; writers put a token of their own in such files (a claim's, a record's), so
  equal bytes are theirs, on disk and in a bucket alike.
- **No hangs.** Every S3 request has a timeout and a bounded number of attempts; an error names the
  location and the problem (no such bucket, access denied, endpoint unreachable).
"""

from fmnist.storage.base import (
    FileStamp,
    IntegrityError,
    NotAFile,
    NotFound,
    PreconditionFailed,
    StorageError,
    StoredFile,
    TooLarge,
    Unreachable,
    UnsafeName,
    inside,
    join,
    name_parts,
    parent,
    refuse_credentials,
    refuse_query,
    without_credentials,
)
from fmnist.storage.scratch import default_scratch_dir
from fmnist.storage.store import SETTLE_S, Stamp, Store, normalize

__all__ = [
    "SETTLE_S",
    "FileStamp",
    "IntegrityError",
    "NotAFile",
    "NotFound",
    "PreconditionFailed",
    "Stamp",
    "StorageError",
    "Store",
    "StoredFile",
    "TooLarge",
    "Unreachable",
    "UnsafeName",
    "default_scratch_dir",
    "inside",
    "join",
    "name_parts",
    "normalize",
    "parent",
    "refuse_credentials",
    "refuse_query",
    "without_credentials",
]
