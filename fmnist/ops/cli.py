"""Operators' command line: the registry's versions and champion, and predictions with the champion.

fashion-mnist versions                 list versions, the champion marked
fashion-mnist show v0003               one version's manifest, gate verdict and file check
fashion-mnist promote v0002            make a version champion by hand
fashion-mnist rollback                 make the previous champion the champion again
fashion-mnist promotions               every champion change, in order (the audit log)
fashion-mnist repair-champion          rewrite a damaged champion.json from the audit log
fashion-mnist repair-log               restore lost audit-log entries from what the registry holds
fashion-mnist rollout status           the canary rollout in progress, and the recent decisions
fashion-mnist rollout promote|abort    decide the canary rollout by hand: make it champion, or roll it back
fashion-mnist predict shoe.png ...     classify 28x28 grayscale PNGs with the champion
fashion-mnist serve [--port 8501]      serve the champion (and labeled versions) over TF Serving's REST
                                       and gRPC (8500) APIs, with metrics; follows promotions and labels
fashion-mnist label canary v0007       serve v0007 as the canary beside the champion (--clear: stop)
fashion-mnist labels                   each label and the version it names
fashion-mnist export v0003 [--out D]   a version's SavedModel, as D/3/ (TF Serving's layout); or: champion
fashion-mnist add-batch DIR [--name N] check a batch of new labeled images, add it to the incoming
                                       folder, and announce it (the ad-hoc deployment retrains)
fashion-mnist review [--submit]        the images serve captured (--capture-rate) into review/ by
                                       predicted class; --submit adds the reviewed folder as a batch
fashion-mnist prune-runs               delete run folders the retention setting does not keep
fashion-mnist automations apply        create or update the automations of automations.yaml
fashion-mnist pools --pool NAME=LIMIT  create or update the work pools and their limits (make pools)
fashion-mnist webhook URL              where notifications go (a Prefect block)

--registry, --data-root and --incoming take a folder or an s3://bucket/prefix URL (credentials from
the AWS_* variables). add-batch and review --submit (their announcements), automations apply, pools and
webhook talk to the Prefect server PREFECT_API_URL names.
"""

from __future__ import annotations

import argparse
import sys

import httpx

from fmnist.data.png import ImageFileError
from fmnist.ops.api import ApiUnreachable, api_failure
from fmnist.ops.commands import data, operations, registry, rollout, serving
from fmnist.ops.commands.roots import DEFAULT_REGISTRY
from fmnist.ops.pools import PoolsError
from fmnist.registry.versions import RegistryError
from fmnist.storage import StorageError


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="fashion-mnist", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    main.add_argument(
        "--registry",
        default=None,
        help=f"registry root: a folder or s3://bucket/prefix (default: FMNIST_REGISTRY_ROOT, else {DEFAULT_REGISTRY}/ "
        "here; add-batch and review refuse that outside the project folder)",
    )
    main.add_argument(
        "--scratch", default=None, help="local folder for verified copies of s3:// files (default: ~/.cache/...)"
    )
    commands = main.add_subparsers(dest="command", required=True)
    for group in (registry, rollout, serving, data, operations):  # in this order in the help
        group.add_commands(commands)
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (
        RegistryError,
        ImageFileError,
        StorageError,
        FileNotFoundError,
        ValueError,
        ApiUnreachable,
        PoolsError,
    ) as exc:
        print(f"fashion-mnist: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:  # the Prefect API's (Prefect's client errors are httpx's)
        print(f"fashion-mnist: {api_failure(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
