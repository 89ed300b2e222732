"""The distributed demo of deploy/compose.yaml, as far as a machine without a container runtime runs it:
its own configuration files, deploy/compose/node.toml and worker.toml, with the compose network's host
names (postgres, rabbitmq, orthanc, node) mapped to this machine's services, ports chosen free, paths
under the test's folder — and nothing else changed. So the node serves HTTPS with a self-signed
certificate made as the compose file's ``certs`` service makes it, the worker checks it against its
``ca_file`` and reads the shared secret from ``secret_file``, as in the demo; a chest radiograph
forwarded by "ORTHANC" is analysed by the worker and its results land in Orthanc.

Needs what tests/test_distributed.py needs (RabbitMQ with rabbitmqctl, PostgreSQL, dcmtk), Orthanc and
openssl.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from sqlalchemy import select

from node.config import load_settings
from node.db import Send, SendStatus, Worker, open_database
from node.runtime.fastest import convertible
from node.runtime.package import discover
from tests.peers import REPO, NodeProcess, OrthancServer, free_port, storescu, wait_for
from tests.test_distributed import pg_url as pg_url  # noqa: F401 - the fixtures
from tests.test_distributed import vhost as vhost  # noqa: F401
from training.chest_phantom import NORMAL, chest_dicom, sample

pytestmark = pytest.mark.distributed

COMPOSE = REPO / "deploy" / "compose"


def compose_file(name: str) -> dict[str, Any]:
    return tomllib.loads((COMPOSE / name).read_text())


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate made as deploy/compose.yaml's ``certs`` service makes it, for this machine's
    loopback address instead of the compose network's host name ``node``."""
    cert, key = folder / "node.pem", folder / "node.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:3072", "-nodes", "-days", "825", "-subj", "/CN=node",
         "-addext", "subjectAltName=DNS:node,DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    key.chmod(0o400)
    return cert, key


@pytest.fixture
def demo(tmp_path: Path, vhost: str, pg_url: str) -> Iterator[tuple[NodeProcess, Path, OrthancServer]]:
    """The compose demo's node and PACS, and the worker's configuration file: the compose files with
    only addresses, ports and paths replaced."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    cert, key = self_signed(tmp_path)
    secret = tmp_path / "worker_secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o400)
    broker = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    pacs = OrthancServer(tmp_path / "orthanc").start()

    node = compose_file("node.toml")
    assert node["jobs"]["executor"] == "celery" and node["node"]["http_host"] == "0.0.0.0"
    node["node"].update(
        data_dir=str(tmp_path / "node"), database_url=pg_url, http_host="127.0.0.1", dicom_port=free_port()
    )
    node["node"]["http_port"] = free_port()
    node["jobs"]["distributed"].update(broker_url=broker, secret_file=str(secret))
    node["tls"].update(cert_file=str(cert), key_file=str(key))
    (destination,) = node["destinations"]
    destination.update(host="127.0.0.1", port=pacs.dicom_port)
    process = NodeProcess(tmp_path / "node", node, ca=cert)

    worker = compose_file("worker.toml")
    worker["node"]["data_dir"] = str(tmp_path / "worker")
    worker["jobs"]["distributed"].update(
        broker_url=broker, node_url=process.url, ca_file=str(cert), secret_file=str(secret)
    )
    worker_config = tmp_path / "worker.toml"
    worker_config.write_bytes(tomli_w.dumps(worker).encode())
    load_settings(worker_config)  # valid as the worker reads it
    try:
        yield process.start(), worker_config, pacs
    finally:
        process.stop()
        pacs.stop()


@pytest.mark.slow
def test_the_compose_demo_over_https_with_the_secret_from_a_file(
    demo: tuple[NodeProcess, Path, OrthancServer], tmp_path: Path, pg_url: str
) -> None:
    node, worker_config, pacs = demo
    assert node.url.startswith("https://")
    log = open(tmp_path / "worker.log", "ab")  # noqa: SIM115 - kept open for the process
    worker = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "worker", "--config", str(worker_config), "--name", "demo-worker"],
        stdout=log,
        stderr=log,
        cwd=REPO,
        start_new_session=True,
    )
    db = open_database(pg_url)
    try:

        def up() -> bool:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            with db.session() as session:  # its heartbeat reached the node over HTTPS
                return session.scalar(select(Worker).where(Worker.name == "demo-worker")) is not None

        wait_for(up, 300, "the worker to reach the node over HTTPS")
        ds = chest_dicom(sample(np.random.default_rng(7), 400, NORMAL), "demo1")
        path = tmp_path / "chest.dcm"
        ds.save_as(path, enforce_file_format=True)
        run = storescu(node.dicom_port, [path], calling="ORTHANC")  # the demo's forwarder
        assert run.returncode == 0, run.stderr

        def sent() -> bool:
            with db.session() as session:
                statuses = session.scalars(select(Send.status)).all()
            return bool(statuses) and all(status == SendStatus.SENT for status in statuses)

        wait_for(sent, 180, "the results sent to Orthanc")
        assert len(pacs.series_in_study(str(ds.StudyInstanceUID))) >= 2  # the image and the node's results
        study = node.study(str(ds.StudyInstanceUID))
        assert study is not None
        assert [job["worker"] for series in study["series"] for job in series["jobs"]] == ["demo-worker"]
        assert [worker["name"] for worker in node.api("/api/workers")] == ["demo-worker"]
        # Before its first job, the worker timed ONNX Runtime against torch for each model that can
        # run under it (the cluster tests' workers skip that trial).
        timed = set(
            re.findall(r"(\S+) runs under (?:ONNX Runtime|torch): ", (tmp_path / "worker.log").read_text())
        )
        assert timed == {
            package.manifest.name for package in discover(REPO / "models") if convertible(package)
        }
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=60)
        db.dispose()
