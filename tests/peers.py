"""Real peers for the tests: Orthanc, dcmtk's tools, dciodvfy, and the node itself as a process."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import tomli_w
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]
from pyorthanc import Orthanc

REPO = Path(__file__).resolve().parent.parent


_HANDED_OUT: set[int] = set()
# Listening ports of services that may be stopped for a moment (RabbitMQ and Erlang's, PostgreSQL's,
# Redis's, MySQL's, MQTT's, NATS's): never handed out, even while nothing listens on them.
_SERVICE_PORTS = {1883, 3306, 4222, 4369, 5432, 5672, 6379, 15672, 25672}
_PICK = random.SystemRandom()


def free_port() -> int:
    """A loopback port for a server the test starts: free now, never handed out before in this test
    session, and below the kernel's ephemeral range, so no outgoing connection (to PostgreSQL, the
    broker, a server polled) can take it before the server binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = _PICK.randrange(max(1024, low - 16384), low)
        if port in _HANDED_OUT or port in _SERVICE_PORTS:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _http_ok(url: str, verify: ssl.SSLContext | bool = True) -> bool:
    try:
        return httpx.get(url, timeout=1, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False


def worklist_plugin() -> Path:
    """Orthanc's ModalityWorklists plugin, where Debian's orthanc package puts it."""
    for folder in (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc")):
        found = sorted(folder.glob("libModalityWorklists.so*"))
        if found:
            return found[0]
    raise FileNotFoundError("Orthanc's ModalityWorklists plugin (libModalityWorklists.so) is not installed")


def write_worklist_entry(
    folder: Path,
    *,
    patient_name: str = "DOE^JANE",
    patient_id: str = "P1",
    patient_birth_date: str = "",  # YYYY-MM-DD
    patient_sex: str = "",
    accession_number: str = "",
    study_uid: str = "",  # empty: a new one
    study_description: str = "",
    scheduled: datetime | None = None,
    modality: str = "XC",
    station_ae: str = "AINODE",
    charset: str | list[str] = "ISO_IR 192",  # how the file encodes its text
) -> Path:
    """One scheduled procedure step as a worklist file (a Part 10 file of the Modality Worklist's
    attributes) in ``folder``, which OrthancServer(worklists=folder) serves; its path."""
    step = Dataset()
    step.Modality = modality
    step.ScheduledStationAETitle = station_ae
    step.ScheduledProcedureStepStartDate = scheduled.strftime("%Y%m%d") if scheduled else ""
    step.ScheduledProcedureStepStartTime = scheduled.strftime("%H%M%S") if scheduled else ""
    step.ScheduledProcedureStepDescription = study_description
    step.ScheduledProcedureStepID = accession_number or "SPS1"
    entry = Dataset()
    entry.SpecificCharacterSet = charset
    entry.PatientName = patient_name
    entry.PatientID = patient_id
    entry.PatientBirthDate = patient_birth_date.replace("-", "")
    entry.PatientSex = patient_sex
    entry.AccessionNumber = accession_number
    entry.StudyInstanceUID = study_uid or generate_uid()
    entry.RequestedProcedureDescription = study_description
    entry.RequestedProcedureID = accession_number or "RP1"
    entry.ScheduledProcedureStepSequence = [step]
    entry.file_meta = FileMetaDataset()
    entry.file_meta.MediaStorageSOPClassUID = ModalityWorklistInformationFind
    entry.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    entry.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{entry.file_meta.MediaStorageSOPInstanceUID}.wl"
    entry.save_as(path, enforce_file_format=True)
    return path


class OrthancServer:
    """A real Orthanc on loopback ports with its own storage folder; the node is a DICOM modality."""

    def __init__(
        self,
        folder: Path,
        node_port: int | None = None,
        lua: Sequence[Path] = (),
        dicom_port: int | None = None,
        options: dict[str, Any] | None = None,  # further Orthanc settings, e.g. its DicomTls* ones
        worklists: Path | None = None,  # a folder of *.wl files (write_worklist_entry) to serve by C-FIND
    ) -> None:
        self.folder = folder
        self.http_port = free_port()
        self.dicom_port = dicom_port or free_port()
        self.aet = "ORTHANC"
        folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "test-pacs",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {},
            "Plugins": [],
            "StableAge": 1,
            # Orthanc closes an idle keep-alive connection after 1 s, the interval tests poll at: a
            # request sent on a connection as it closes gets no answer. One connection per request.
            "KeepAlive": False,
            "LuaScripts": [str(path) for path in lua],
            **(options or {}),
        }
        if node_port is not None:
            config["DicomModalities"]["ainode"] = ["AINODE", "127.0.0.1", node_port]
        if worklists is not None:
            config["Plugins"].append(str(worklist_plugin()))
            config["Worklists"] = {"Enable": True, "Database": str(worklists)}
            config["DicomAlwaysAllowFindWorklist"] = True  # a worklist is asked by any modality
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.client = Orthanc(self.url)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OrthancServer:
        """Start Orthanc and wait until it answers; an Orthanc that exits instead (a port in use, a
        bad setting) is an error that quotes its log at once."""
        log_path = self.folder / "orthanc.log"
        log = open(log_path, "wb")  # noqa: SIM115 - kept open for the process
        self.process = process = subprocess.Popen(
            ["Orthanc", str(self.folder / "orthanc.json")], stdout=log, stderr=log
        )
        wait_for(lambda: process.poll() is not None or _http_ok(f"{self.url}/system"), 30, "Orthanc to start")
        if process.poll() is not None:
            self.process = None
            raise RuntimeError(
                f"Orthanc exited with {process.returncode}:\n{log_path.read_text(errors='replace')[-2000:]}"
            )
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None

    def series_in_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Every series Orthanc holds for a StudyInstanceUID, with its main tags and instance ids."""
        found = self.client.post_tools_find(
            json={"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
        )
        return list(found)

    def sop_class(self, instance_id: str) -> str:
        return str(self.client.get_instances_id_metadata_name(instance_id, "SopClassUid")).strip()

    def file(self, orthanc_id: str) -> bytes:
        return bytes(self.client.get_instances_id_file(orthanc_id))


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(
    port: int,
    files: Sequence[Path],
    called: str = "AINODE",
    calling: str = "STORESCU",
    extra: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu; proposes each file's own transfer syntax besides the uncompressed ones."""
    command = ["storescu", "-v", "-aec", called, "-aet", calling, *extra, "127.0.0.1", str(port)]
    return subprocess.run(
        [*command, *map(str, files)], capture_output=True, text=True, env=dcmtk_env(), timeout=300
    )


def echoscu(
    port: int, called: str = "AINODE", calling: str = "ECHOSCU", extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-aec", called, "-aet", calling, *extra, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=60,
    )


def dcmtk_tls(key: Path | None, cert: Path | None, ca: Path) -> list[str]:
    """dcmtk's options for DICOM TLS: show ``cert`` (none: anonymous TLS), trust the CA ``ca``."""
    shown = ["+tls", str(key), str(cert)] if key and cert else ["+tla"]
    return [*shown, "+cf", str(ca)]


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's Error lines for a file (warnings are fine: IHE's rule is no errors)."""
    # It quotes values as their bytes: a Korean name is not UTF-8.
    run = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60
    )
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


def dsrdump(path: Path) -> str:
    run = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


class NodeProcess:
    """The node as users run it: ``ainode serve --config FILE`` in its own process."""

    def __init__(self, folder: Path, settings: dict[str, Any], ca: Path | None = None) -> None:
        """``ca``: the CA that the node's HTTPS certificate (``[tls] cert_file``) is checked against."""
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        node = settings.setdefault("node", {})
        node.setdefault("ae_title", "AINODE")
        node.setdefault("dicom_host", "127.0.0.1")
        node.setdefault("dicom_port", free_port())
        node.setdefault("http_port", free_port())
        node.setdefault("data_dir", str(folder / "var"))
        node.setdefault("models_dir", str(REPO / "models"))
        node.setdefault("min_free_disk_mb", 1)
        self.settings = settings
        self.config = folder / "config.toml"
        self.config.write_bytes(tomli_w.dumps(settings).encode())
        self.dicom_port = int(node["dicom_port"])
        scheme = "https" if settings.get("tls", {}).get("cert_file") else "http"
        self.url = f"{scheme}://127.0.0.1:{node['http_port']}"
        self.verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if ca else True
        self.process: subprocess.Popen[bytes] | None = None
        self.log = folder / "node.log"
        self.token = ""  # an admin API token for api() and study(), made before the first start

    def _api_token(self) -> str:
        """An admin API token in the node's database: the API answers nobody without one."""
        from node import audit
        from node.accounts import create_token
        from node.config import load_settings
        from node.db import open_database

        settings = load_settings(self.config)
        db = open_database(settings.node.resolved_database_url)
        audit.configure(db, settings)  # the token's audit event joins the node's keyed chain
        try:
            return create_token(db, "test-harness", "admin", actor="test")
        finally:
            db.dispose()

    def start(self) -> NodeProcess:
        self.token = self.token or self._api_token()
        log = open(self.log, "ab")  # noqa: SIM115 - kept open for the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config)],
            stdout=log,
            stderr=log,
            cwd=REPO,
        )
        wait_for(self._healthy, 60, "the node to start")
        return self

    def _healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"node exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        return _http_ok(f"{self.url}/healthz", self.verify)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as in a power cut or an OOM kill."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=20)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def api(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", headers=self.headers, timeout=10, verify=self.verify)
        response.raise_for_status()
        return response.json()

    def study(self, study_uid: str) -> dict[str, Any] | None:
        response = httpx.get(
            f"{self.url}/api/studies/{study_uid}", headers=self.headers, timeout=10, verify=self.verify
        )
        return response.json() if response.status_code == 200 else None
