"""`fashion-mnist pools` (make pools) without a server: its NAME=LIMIT refusals, a pool another client makes or
deletes while it applies (a stand-in for Prefect's client, which no real server can be timed to), and an API
that does not answer. Against a real server: tests/test_e2e.py."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, PrefectHTTPStatusError

from fmnist.ops import cli
from fmnist.ops.api import api_failure
from fmnist.ops.pools import MAX_LIMIT, POOL_TYPE, PoolsError, upsert
from tests.processes import free_ports


@pytest.mark.parametrize(
    "spec",
    [
        "cpu=0",
        f"cpu={MAX_LIMIT + 1}",
        "cpu=1.5",
        "cpu=-1",
        "cpu=",
        "cpu",
        "=1",
        "cpu/../x=1",
        "cpu pool=1",
        "-cpu=1",
        "cpu=\u0661",  # a digit to str.isdigit
        "cpu=1\n",
        "p" * 101 + "=1",
        "prefect-cpu=1",  # Prefect keeps these names
        "Prefect=1",
    ],
)
def test_a_bad_pool_is_a_usage_error_naming_it(spec: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["pools", f"--pool={spec}"])
    assert exited.value.code == 2 and repr(spec) in capsys.readouterr().err


def test_a_pool_named_twice_is_refused_before_the_api_is_asked(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["pools", "--pool", "cpu=1", "--pool", "cpu=2"]) == 1
    assert "a pool named twice: cpu" in capsys.readouterr().err


class RacingClient:
    """Prefect's client's work-pool calls on a dict of pools, where `meanwhile` runs once, before the first write:
    another client's create or delete between this one's read (`upsert`'s `exists`) and its write."""

    def __init__(self, pools: dict, meanwhile) -> None:
        self.pools, self.meanwhile, self.calls = pools, meanwhile, []

    def read_work_pool(self, name: str):
        self.calls.append("read")
        if name not in self.pools:
            raise ObjectNotFound(None)
        return self.pools[name]

    def create_work_pool(self, pool) -> None:
        self.calls.append("create")
        self._another_client()
        if pool.name in self.pools:
            raise ObjectAlreadyExists(None)
        self.pools[pool.name] = SimpleNamespace(name=pool.name, type=pool.type, limit=pool.concurrency_limit)

    def update_work_pool(self, name: str, update) -> None:
        self.calls.append("update")
        self._another_client()
        if name not in self.pools:
            raise ObjectNotFound(None)
        self.pools[name].limit = update.concurrency_limit

    def _another_client(self) -> None:
        if self.meanwhile:
            self.meanwhile(self.pools)
            self.meanwhile = None


def test_a_pool_made_by_another_client_meanwhile_is_updated() -> None:
    made = SimpleNamespace(name="cpu", type=POOL_TYPE, limit=9)
    client = RacingClient({}, lambda pools: pools.update(cpu=made))
    assert upsert(client, "cpu", 1, {}, exists=False) == "updated"
    assert client.pools["cpu"].limit == 1 and client.calls == ["create", "read", "update"]


def test_a_pool_deleted_by_another_client_meanwhile_is_made() -> None:
    client = RacingClient({"cpu": SimpleNamespace(name="cpu", type=POOL_TYPE, limit=9)}, lambda pools: pools.clear())
    assert upsert(client, "cpu", 2, {}, exists=True) == "created"
    assert client.pools["cpu"].limit == 2 and client.calls == ["update", "create"]


def test_a_pool_of_another_type_made_meanwhile_is_refused_not_overwritten() -> None:
    docker = SimpleNamespace(name="cpu", type="docker", limit=None)
    client = RacingClient({}, lambda pools: pools.update(cpu=docker))
    with pytest.raises(PoolsError, match="'cpu' is of type 'docker'"):
        upsert(client, "cpu", 1, {}, exists=False)
    assert client.pools["cpu"] is docker and docker.limit is None


def test_an_api_that_does_not_answer_is_one_line_naming_what_was_not_applied() -> None:
    [port] = free_ports(1)
    env = {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_CLIENT_MAX_RETRIES": "0"}
    command = [sys.executable, "-m", "fmnist.ops.cli", "pools", "--pool", "cpu=1", "--pool", "gpu=1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "the Prefect API failed" in line and "applied: none; not applied: cpu, gpu (run it again)" in line


def test_a_prefect_api_error_keeps_its_status_and_answer_and_drops_credentials() -> None:
    request = httpx.Request("GET", "http://admin:s3cret@127.0.0.1:9/api/block_types")
    answer = httpx.Response(500, json={"detail": "boom"}, request=request)
    with pytest.raises(httpx.HTTPStatusError) as raised:
        answer.raise_for_status()
    said = api_failure(PrefectHTTPStatusError.from_httpx_error(raised.value))
    assert "500 Internal Server Error" in said and "boom" in said and "http://127.0.0.1:9/api/block_types" in said
    assert "s3cret" not in said and "admin" not in said and "more information" not in said
    refused = api_failure(httpx.ConnectError("[Errno 111] Connection refused", request=request))
    assert refused == "the Prefect API failed: http://127.0.0.1:9/api/block_types: [Errno 111] Connection refused"
