"""End to end across hosts that share no disk: a Prefect server, a CPU worker and GPU workers, each in
an empty folder and home of its own; the cluster deployments clone the code per run from a bare git
repository (file://) at the commit pinned by `make deploy-cluster`; data, cache, registry and run folders
live in a bucket of a real S3 server (SeaweedFS). The operator's CLI then reads the bucket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist.registry.versions import Registry
from fmnist.storage import Store, join
from tests.helpers import synthetic_images, write_mirror
from tests.prefect_stack import PREFECT, ROOT, Stack, make, prefect_server, wait_for
from tests.processes import stop
from tests.seaweedfs import SECRET_KEY, S3Server

pytestmark = pytest.mark.e2e
CPU_POOL, GPU_POOL = "fashion-mnist-cpu", "fashion-mnist-gpu"
# The workers' `prefect`: this environment's by default. Point it at a bare environment (a venv with only
# `pip install prefect==3.8.8 "fastapi<0.151"`) to check the README's three commands for a new host: its
# first run then installs requirements/cpu.txt from PyPI.
WORKER_PREFECT = os.environ.get("FMNIST_E2E_WORKER_PREFECT", PREFECT)


def snapshot_repository(tmp: Path) -> tuple[str, str]:
    """The working tree (tracked and untracked files git does not ignore) as a commit in a bare repository.

    The test deploys exactly the code under test, committed or not; the checkout's own index and
    branches are left alone.
    """
    env = {
        **os.environ,
        "GIT_INDEX_FILE": str(tmp / "snapshot-index"),
        **{
            f"GIT_{who}_{what}": value
            for who in ("AUTHOR", "COMMITTER")
            for what, value in (("NAME", "e2e"), ("EMAIL", "e2e@localhost"))
        },
    }

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True
        ).stdout.strip()

    git("add", "--all")
    commit = git("commit-tree", git("write-tree"), "-m", "working tree, for the cluster end-to-end test")
    bare = tmp / "fashion-mnist-pipeline.git"
    subprocess.run(["git", "init", "--quiet", "--bare", str(bare)], check=True)
    git("push", "--quiet", str(bare), f"{commit}:refs/heads/main")
    return bare.as_uri(), commit


@dataclass
class Cluster:
    stack: Stack
    s3: S3Server
    bucket: str
    commit: str
    hosts: Path

    def host(self, name: str) -> tuple[Path, dict[str, str]]:
        """A host's own empty folder (its working directory and home) and its environment."""
        home = self.hosts / name
        home.mkdir(parents=True, exist_ok=True)
        env = {**self.stack.env, **self.s3.env(), "HOME": str(home), "PREFECT_HOME": str(home / ".prefect")}
        env.pop("XDG_CACHE_HOME", None)
        return home, env

    def start_worker(self, host: str, pool: str, *options: str) -> subprocess.Popen:
        home, env = self.host(host)
        args = ("worker", "start", "--pool", pool, *options)
        return self.stack.start(f"worker-{host}", *args, cwd=home, env=env, prefect=WORKER_PREFECT)

    def operator(self, *args: str) -> subprocess.CompletedProcess:
        """The operators' CLI on another machine again: only the AWS variables and the bucket's URL."""
        home, env = self.host("operator")
        cli = str(Path(sys.executable).parent / "fashion-mnist")
        return subprocess.run(
            [cli, "--registry", f"{self.bucket}/registry", *args], cwd=home, env=env, capture_output=True, text=True
        )

    def registry(self) -> Registry:
        return Registry(Store(scratch=self.hosts / "inspector"), f"{self.bucket}/registry")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    repository, commit = snapshot_repository(tmp)
    bucket = f"s3://{s3_server.new_bucket()}"
    with prefect_server(tmp) as stack, pytest.MonkeyPatch.context() as env:
        for name, value in s3_server.env().items():  # for the test's own look into the bucket
            env.setenv(name, value)
        make(
            stack,
            "deploy-cluster",
            FMNIST_REPO_URL=repository,
            FMNIST_COMMIT=commit,
            FMNIST_DATA_ROOT=f"{bucket}/data",
            FMNIST_REGISTRY_ROOT=f"{bucket}/registry",
            # TensorFlow's CUDA libraries are 3 GB; this machine has no GPU, so its GPU pool installs the CPU set.
            FMNIST_GPU_REQUIREMENTS="requirements/cpu.txt",
        )
        cluster = Cluster(stack, s3_server, bucket, commit, tmp / "hosts")
        cluster.start_worker("cpu-host", CPU_POOL)
        yield cluster


@pytest.fixture(scope="module")
def run_params(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Generated data on a mirror in the bucket (a mirror may be an s3:// folder too)."""
    folder = tmp_path_factory.mktemp("mirror")
    spec = write_mirror(folder, train_per_class=50, test_per_class=10)
    cluster.s3.filesystem().put(f"{folder}/", cluster.bucket.removeprefix("s3://") + "/mirror/", recursive=True)
    return {
        "mirrors": [f"{cluster.bucket}/mirror/"],
        "dataset": spec.model_dump(),
        "training": {"epochs": 1},
        "promotion": {"min_accuracy": 0.5},
    }


def test_cluster_deployments_pin_the_commit_and_the_bucket(cluster: Cluster) -> None:
    adhoc = cluster.stack.get("/deployments/name/retrain-fashion-mnist/adhoc-cluster")
    assert adhoc["parameters"] == {
        "training_deployment": "train-fashion-mnist/gpu-cluster",
        "storage": {"data_root": f"{cluster.bucket}/data", "registry_root": f"{cluster.bucket}/registry"},
    }
    clone = adhoc["pull_steps"][0]["prefect.deployments.steps.git_clone"]
    assert clone["commit_sha"] == cluster.commit and clone["repository"].endswith("fashion-mnist-pipeline.git")
    install = adhoc["pull_steps"][1]["prefect.deployments.steps.pip_install_requirements"]
    assert install == {"directory": "{{ clone.directory }}", "requirements_file": "requirements/cpu.txt"}
    nightly = cluster.stack.get("/deployments/name/retrain-fashion-mnist/nightly-cluster")
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["parameters"]["params"] == {"training": {"preset": "cnn"}, "promotion": {"rollout": "canary"}}
    assert nightly["parameters"]["storage"] == adhoc["parameters"]["storage"]
    assert cluster.stack.get("/deployments/name/train-fashion-mnist/gpu-cluster")["work_pool_name"] == GPU_POOL


def test_a_run_across_hosts_that_share_no_disk(cluster: Cluster, run_params: dict, tmp_path: Path) -> None:
    gpu_worker = cluster.start_worker("gpu-host", GPU_POOL)
    run = cluster.stack.finished(cluster.stack.deployment_run("retrain-fashion-mnist/adhoc-cluster", params=run_params))
    stop(gpu_worker)
    assert run["state_type"] == "COMPLETED", run["state"]
    [training] = cluster.stack.child_runs(run["id"], "gpu-cluster")
    assert training["state_type"] == "COMPLETED" and training["work_pool_name"] == GPU_POOL
    assert training["parameters"]["run"] == {"location": f"{cluster.bucket}/registry/runs/{run['id']}"}

    registry = cluster.registry()
    assert registry.versions() == ["v0001"] and registry.champion() == "v0001"
    assert registry.damaged_files("v0001") == []  # every file in the bucket hashes to its manifest
    manifest = registry.manifest("v0001")
    assert manifest.flow_run_id == run["id"]
    assert manifest.code.git_commit == cluster.commit  # both hosts ran the pinned commit, cloned per run
    # Each host kept verified copies in its own scratch folder; nothing else of the pipeline's on its disk.
    for host in ("cpu-host", "gpu-host"):
        scratch = cluster.hosts / host / ".cache" / "fashion-mnist-pipeline"
        assert any(p.suffix == ".parquet" for p in (scratch / "objects").iterdir())
        assert not [p for p in (cluster.hosts / host).rglob("*") if p.name in ("data", "artifacts", ".git")]
    assert SECRET_KEY not in "".join(cluster.stack.artifacts(run["id"]).values())

    listed = cluster.operator("versions")
    assert listed.returncode == 0 and "* v0001" in listed.stdout, listed.stderr
    pngs = []
    for label in (1, 7, 9):
        png = tmp_path / f"class-{label}.png"
        Image.fromarray(synthetic_images(np.array([label]), seed=label)[0]).save(png)
        pngs.append(str(png))
    predicted = cluster.operator("predict", *pngs)
    assert predicted.returncode == 0, predicted.stderr
    assert [line.split("\t")[1] for line in predicted.stdout.splitlines()[1:]] == ["Trouser", "Sneaker", "Ankle boot"]


@pytest.mark.recovery
def test_a_replacement_gpu_host_resumes_a_crashed_training_run(cluster: Cluster, run_params: dict) -> None:
    epochs = 30
    stack, store = cluster.stack, Store(scratch=cluster.hosts / "inspector")
    before = cluster.registry().versions()  # the module's other runs' (none in make test-recovery)
    cli = stack.deployment_run(
        "retrain-fashion-mnist/adhoc-cluster", params={**run_params, "training": {"epochs": epochs}}
    )
    [parent] = wait_for(
        "the retraining run to start",
        lambda: stack.filter(
            "/flow_runs/filter",
            {
                "deployments": {"name": {"any_": ["adhoc-cluster"]}},
                "flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}},
            },
        ),
        timeout_s=300,
        every_s=0.2,
    )
    wait_for("the training run to be scheduled", lambda: stack.child_runs(parent["id"], "gpu-cluster"), timeout_s=300)
    # The first GPU host takes that one run. Once a few epochs are in the bucket the host is lost: its
    # training process is SIGKILLed; the worker reports the run Crashed and, started with --run-once, exits.
    first_host = cluster.start_worker("gpu-host-1", GPU_POOL, "--run-once", "--limit", "1")
    history = join(cluster.bucket, "registry", "runs", parent["id"], "history.json")

    def epochs_saved() -> int:
        return len(store.read_json(history)["epochs"]) if store.exists(history) else 0

    wait_for("two epochs in the bucket", lambda: epochs_saved() >= 2, timeout_s=300, every_s=0.05)
    children = subprocess.run(["pgrep", "-P", str(first_host.pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    killed_after = epochs_saved()
    assert children and killed_after < epochs - 5, "the training run ended before it could be killed"
    first_host.wait(timeout=120)

    # A replacement GPU host, with nothing on its disk: it gets the re-submitted run and resumes it.
    cluster.start_worker("gpu-host-2", GPU_POOL)
    run = stack.finished(cli)
    assert run["id"] == parent["id"] and run["state_type"] == "COMPLETED", run["state"]
    training = stack.child_runs(run["id"], "gpu-cluster")
    assert [r["state_type"] for r in training] == ["CRASHED", "COMPLETED"]
    logs = stack.logs([training[1]["id"]])
    [restored] = [m for m in logs if m.startswith("Restored the checkpoint of epoch")]
    resumed_epoch = int(restored.split("epoch ")[1].split(" ")[0])
    # Resumed after the last epoch whose snapshot was complete in the bucket: not restarted.
    assert 1 <= resumed_epoch <= killed_after + 1
    assert [h["epoch"] for h in store.read_json(history)["epochs"]] == list(range(1, epochs + 1))
    assert (cluster.hosts / "gpu-host-2" / ".cache" / "fashion-mnist-pipeline" / "runs" / run["id"]).is_dir()
    assert store.listdir(join(cluster.bucket, "registry", "runs", run["id"], "backup")) == []
    assert cluster.registry().versions() == [*before, f"v{len(before) + 1:04d}"]  # one version, this run's
