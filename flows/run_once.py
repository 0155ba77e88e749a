"""One retraining run in this process (`make run`), with Prefect's temporary server started first.

Called bare, a flow starts Prefect's temporary API server when it is called, after this process's
imports, and waits for it: about 5 s here, 10 s the first time, when its database is made. Started
first, in a child process, the server comes up while this process imports the pipeline and the libraries
the run is sure to need: great-expectations when the data root holds no validation yet, TensorFlow
when the registry has no champion (or `force_retrain`). A run that may find nothing changed imports
neither. With `PREFECT_API_URL` set (an operator's server) nothing is started, and the runs send
heartbeats as that server's settings say.

    python -m flows.run_once [--params '{"training": {"epochs": 10}}']
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from fmnist.ops.temporary_server import start_temporary_server

if TYPE_CHECKING:
    from flows.params import RetrainParams
    from fmnist.storage.layout import StorageParams


def import_what_the_run_needs(params: RetrainParams, storage: StorageParams) -> None:
    """Import the heavy libraries this run is certain to import anyway: only the wait moves."""
    from fmnist.data.contract import import_great_expectations
    from fmnist.registry.versions import Registry, RegistryError

    store = storage.store()
    if not store.listdir(storage.data.validation):
        import_great_expectations()
    try:
        needs_training = params.force_retrain or Registry(store, storage.registry).champion() is None
    except RegistryError:  # a damaged registry: the run itself says so, with the repair to make
        needs_training = False
    if needs_training:
        import tensorflow  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.run_once", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="{}", help="RetrainParams as JSON (the flow's `params`)")
    args = parser.parse_args(argv)

    # Before Prefect is imported: the server's start overlaps this process's imports.
    api_url = None if os.environ.get("PREFECT_API_URL") else start_temporary_server()
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.params import RetrainParams
    from flows.retrain import retrain
    from fmnist.storage.layout import StorageParams

    params, storage = RetrainParams.model_validate_json(args.params), StorageParams()
    import_what_the_run_needs(params, storage)
    # Heartbeats let an operator's server crash a run whose host died. The temporary server lives and dies
    # with this process, and each flow run's heartbeat thread (on by default in Prefect 3.8) costs up to a
    # second at the run's end, as it is joined: off for it.
    temporary = {PREFECT_API_URL: api_url(), PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None} if api_url else {}
    with temporary_settings(temporary):
        outcome = retrain(params, storage)
    if outcome.version is None:
        print(f"Champion {outcome.champion} is current; nothing retrained.")
    else:
        print(
            f"Registered {outcome.version} (test accuracy {outcome.test_accuracy:.4f}, "
            f"{'promoted' if outcome.promoted else 'not promoted'}); champion: {outcome.champion}"
        )
        print(f"Version folder (model, model card, manifest, metrics, plots): {outcome.version_dir}")


if __name__ == "__main__":
    main()
