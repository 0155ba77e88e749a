"""The operator's housekeeping: prune-runs, and the Prefect side (automations apply, pools, webhook,
wait-for-api, worker), which talks to the server PREFECT_API_URL names."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fmnist.ops import automations, pools
from fmnist.ops.api import API_WAIT_S, wait_for_api
from fmnist.ops.commands.roots import registry_of
from fmnist.ops.flags import bounded
from fmnist.ops.worker import WORKER_STOP_S, run_worker
from fmnist.registry.retention import RetentionParams, prune_runs
from fmnist.storage.layout import runs_root


def cmd_prune_runs(args: argparse.Namespace) -> None:
    registry = registry_of(args)
    retention = RetentionParams(keep_last=args.keep_last, keep_days=args.keep_days)
    runs = runs_root(registry.root)
    deleted = prune_runs(registry, runs, retention, keep=set())
    print(f"Deleted {len(deleted)} run folders from {runs}: {', '.join(deleted) or 'none'}")


def prefect_api_url() -> str:
    """The Prefect API these commands talk to. Without one, Prefect would use a throwaway database of this
    machine's own: the command would report success, and no server would ever see what it did."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ValueError(
            "PREFECT_API_URL is not set: point it at the Prefect server (make server starts one; the make targets "
            "set it from PREFECT_PORT)"
        )
    return url


def cmd_automations_apply(args: argparse.Namespace) -> None:
    prefect_api_url()
    applied = automations.apply(args.file, args.heartbeat_s, args.start_window_s, args.retrain_on_drift)
    for verb in ("created", "updated", "deleted"):
        for name in getattr(applied, verb):
            print(f"{verb:8} {name}")
    for name, why in applied.skipped.items():
        print(f"left out {name} ({why})")


def cmd_pools(args: argparse.Namespace) -> None:
    names = [name for name, _ in args.pools]
    if len(set(names)) < len(names):
        raise ValueError(f"a pool named twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    prefect_api_url()
    pools.apply_pools(dict(args.pools), say=lambda line: print(line, flush=True))


def pool_limit_flag(text: str) -> tuple[str, int]:
    try:
        return pools.pool_limit(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_webhook(args: argparse.Namespace) -> None:
    prefect_api_url()
    block_id = automations.configure_webhook(args.url)
    print(
        f"Notifications go to the webhook block {automations.WEBHOOK_BLOCK!r} ({block_id}); run make deploy "
        "(or fashion-mnist automations apply) to connect the automations to it"
    )


def cmd_wait_for_api(args: argparse.Namespace) -> None:
    url = prefect_api_url()
    tries = wait_for_api(url, args.timeout_s, say=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"the Prefect API at {url} answers" + (f" (try {tries})" if tries > 1 else ""))


def cmd_worker(args: argparse.Namespace) -> None:
    prefect_api_url()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    raise SystemExit(run_worker(args.pool, extra, stop_within_s=args.stop_within_s))


def add_commands(commands: argparse._SubParsersAction) -> None:
    prune = commands.add_parser("prune-runs", help="delete run folders beyond the retention setting")
    prune.add_argument("--keep-last", type=bounded(int, 1, 100_000), default=RetentionParams().keep_last)
    prune.add_argument("--keep-days", type=bounded(float, 0, 36_500), default=RetentionParams().keep_days)
    prune.set_defaults(run=cmd_prune_runs)
    auto = commands.add_parser("automations", help="the pipeline's Prefect automations")
    auto_commands = auto.add_subparsers(dest="action", required=True)
    apply = auto_commands.add_parser("apply", help="create or update the automations of a file, by name")
    apply.add_argument("--file", type=Path, default=Path("automations.yaml"))
    apply.add_argument(
        "--heartbeat-s",
        type=bounded(int, automations.MIN_HEARTBEAT_S, automations.MAX_HEARTBEAT_S),
        default=60,
        help="the flow runs' heartbeat interval (Prefect's minimum is 30 s)",
    )
    apply.add_argument(
        "--start-window-s",
        type=bounded(int, automations.MIN_START_WINDOW_S, automations.MAX_HEARTBEAT_S),
        default=automations.START_WINDOW_S,
        help="a run handed to a worker that has not started this long after is marked Crashed",
    )
    apply.add_argument(
        "--retrain-on-drift",
        metavar="DEPLOYMENT",
        help="the deployment a drifted champion starts (e.g. retrain-fashion-mnist/adhoc); without it, none",
    )
    apply.set_defaults(run=cmd_automations_apply)
    pool = commands.add_parser(
        "pools", help=f"create or update {pools.POOL_TYPE} work pools and their limits of runs at once (make pools)"
    )
    pool.add_argument(
        "--pool",
        dest="pools",
        action="append",
        required=True,
        type=pool_limit_flag,
        metavar="NAME=LIMIT",
        help="a pool, and how many runs it takes at once (repeat for each pool)",
    )
    pool.set_defaults(run=cmd_pools)
    webhook = commands.add_parser("webhook", help="set the URL notifications are POSTed to")
    webhook.add_argument("url")
    webhook.set_defaults(run=cmd_webhook)
    wait = commands.add_parser("wait-for-api", help="wait, trying visibly, until the Prefect API answers")
    wait.add_argument(
        "--timeout-s", type=bounded(float, 0, 3600), default=API_WAIT_S, help="give up after this long, naming the URL"
    )
    wait.set_defaults(run=cmd_wait_for_api)
    worker = commands.add_parser(
        "worker", help="a Prefect process worker that, stopped with SIGTERM or Ctrl-C, hands its runs back"
    )
    worker.add_argument("--pool", required=True, help="the work pool to serve")
    worker.add_argument(
        "--stop-within-s",
        type=bounded(float, 5, 3600),
        default=WORKER_STOP_S,
        help="once told to stop, exit within this long whatever the API's state, naming the runs not handed back",
    )
    worker.add_argument("extra", nargs=argparse.REMAINDER, help="-- then more `prefect worker start` options")
    worker.set_defaults(run=cmd_worker)
