"""Nothing unencrypted leaves the node (issue 11, Security): DICOM TLS in (dcmtk) and out (Orthanc with
DICOM TLS), HTTPS for the dashboard, and a configuration that would serve plain HTTP to the network or
use unusable certificate files refused before anything starts."""

from __future__ import annotations

import contextlib
import html
import logging
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import tomli_w
from pydicom.uid import CTImageStorage
from sqlalchemy import select

from node import audit
from node.config import ConfigError, Settings, load_settings
from node.db import Database, Job, Result, Send, SendStatus, open_database
from node.dicom import tls
from node.ingest.completion import mark_stable
from node.route import route_ready
from node.send import Sender, echo
from node.spool import Spool
from tests.peers import REPO, NodeProcess, OrthancServer, dcmtk_tls, echoscu, free_port, storescu, wait_for
from tests.test_faults_listener import refusals
from tests.test_flow import ROUTES, instance, store
from tests.test_receive import audited, indexed
from tests.web import csrf, logged_in, make_user
from tests.web import login as web_login
from training.ct_phantom import write_head_ct_series


@dataclass(frozen=True)
class Pki:
    """A test CA and what it signed (certificate, key): the node, a sender; and a CA nobody trusts."""

    ca: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    rogue_ca: Path
    rogue_client: tuple[Path, Path]


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", key, "-out", cert,
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _issue(folder: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost, good for a TLS server and client alike, its key mode 600."""
    cert, key, request, extensions = (folder / f"{name}{ext}" for ext in (".pem", ".key", ".csr", ".ext"))
    extensions.write_text(
        "subjectAltName = DNS:localhost, IP:127.0.0.1\nextendedKeyUsage = serverAuth, clientAuth\n"
        "basicConstraints = CA:FALSE\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n"
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", key, "-out", request)
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-days", "2", "-out", cert, "-extfile", extensions,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = _ca(folder, "test-ca"), _ca(folder, "rogue-ca")
    return Pki(
        ca=ca[0],
        server=_issue(folder, "node", ca),
        client=_issue(folder, "modality", ca),
        rogue_ca=rogue[0],
        rogue_client=_issue(folder, "rogue", rogue),
    )


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_head_ct_series(tmp_path_factory.mktemp("ct"), 1, hemorrhage=False, seed=7, size=64)[0]


def tls_section(pki: Pki, **more: object) -> dict[str, object]:
    cert, key = pki.server
    return {"cert_file": str(cert), "key_file": str(key), "ca_file": str(pki.ca), **more}


@pytest.fixture(scope="module")
def node(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node with a DICOM TLS port that requires a sender certificate, beside its plain port, and HTTPS."""
    settings = {
        # refusals written each second, so that every test can see its own counted
        "node": {"allowed_calling_aets": ["STORESCU", "ECHOSCU"], "refusal_audit_seconds": 1},
        "tls": tls_section(pki, dicom_port=free_port(), require_client_cert=True),
    }
    process = NodeProcess(tmp_path_factory.mktemp("tls-node"), settings, ca=pki.ca).start()
    yield process
    process.stop()


def tls_port(node: NodeProcess) -> int:
    return int(node.settings["tls"]["dicom_port"])


def tls_refusals(node: NodeProcess) -> int:
    """How many TLS refusals the node's audit entries stand for (each entry counts several)."""
    return sum(int(detail["count"]) for detail in refusals(node, "association.tls_refused"))


def test_echo_and_store_over_tls_with_a_client_certificate(node: NodeProcess, pki: Pki, ct: Path) -> None:
    shown = dcmtk_tls(*reversed(pki.client), pki.ca)
    echoed = echoscu(tls_port(node), extra=shown)
    assert echoed.returncode == 0, echoed.stderr
    stored = storescu(tls_port(node), [ct], extra=shown)
    assert stored.returncode == 0, stored.stdout + stored.stderr
    indexed(node, 1)
    # Plain DICOM stays available on its own port, for modalities that cannot do TLS.
    assert echoscu(node.dicom_port).returncode == 0


@pytest.mark.parametrize("sender", ["no certificate", "untrusted certificate", "plain DICOM"])
def test_tls_port_refuses_senders_it_cannot_trust(node: NodeProcess, pki: Pki, ct: Path, sender: str) -> None:
    extra = {
        "no certificate": dcmtk_tls(None, None, pki.ca),
        "untrusted certificate": dcmtk_tls(*reversed(pki.rogue_client), pki.ca),
        "plain DICOM": [],
    }[sender]
    before = tls_refusals(node)
    assert echoscu(tls_port(node), extra=extra).returncode != 0
    assert storescu(tls_port(node), [ct], extra=extra).returncode != 0
    wait_for(lambda: tls_refusals(node) >= before + 2, 10, "both refusals audited")
    assert echoscu(tls_port(node), extra=dcmtk_tls(*reversed(pki.client), pki.ca)).returncode == 0


def test_a_silent_connection_does_not_hold_the_tls_port(node: NodeProcess, pki: Pki) -> None:
    """The handshake happens in the association's thread: a socket that never speaks TLS blocks no one."""
    with socket.create_connection(("127.0.0.1", tls_port(node))):
        started = time.monotonic()
        echoed = echoscu(tls_port(node), extra=dcmtk_tls(*reversed(pki.client), pki.ca))
        assert echoed.returncode == 0, echoed.stderr
        assert time.monotonic() - started < 5


def test_the_listener_limits_hold_on_the_tls_port(node: NodeProcess, pki: Pki) -> None:
    """A TLS peer that announces a PDU over ``max_pdu_bytes`` is aborted at once, as on the plain port
    (node.dicom.limits): bytes inside TLS are guarded too."""
    context = ssl.create_default_context(cafile=pki.ca)
    context.load_cert_chain(*pki.client)
    with (
        socket.create_connection(("127.0.0.1", tls_port(node)), timeout=10) as plain,
        context.wrap_socket(plain, server_hostname="127.0.0.1") as secure,
    ):
        started = time.monotonic()
        secure.sendall(b"\x01\x00" + (2**32 - 1).to_bytes(4, "big") + bytes(64))  # a 4 GB A-ASSOCIATE-RQ
        answer = secure.recv(64)
        assert time.monotonic() - started < 5
    assert answer[:1] == b"\x07" and answer[-1:] == b"\x06"  # A-ABORT, invalid PDU parameter value


def _handshake(port: int, pki: Pki, version: ssl.TLSVersion) -> None:
    """A TLS handshake at exactly ``version`` (lower versions need OpenSSL's security level 0)."""
    context = ssl.create_default_context(cafile=pki.ca)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = context.maximum_version = version
    context.load_cert_chain(*pki.client)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as plain,
        context.wrap_socket(plain, server_hostname="127.0.0.1"),
    ):
        pass


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")  # on purpose
@pytest.mark.parametrize("port", ["dicom", "https"])
def test_tls_below_1_2_is_refused(node: NodeProcess, pki: Pki, port: str) -> None:
    number = tls_port(node) if port == "dicom" else int(node.settings["node"]["http_port"])
    _handshake(number, pki, ssl.TLSVersion.TLSv1_2)
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises(ssl.SSLError):
            _handshake(number, pki, old)


def test_dashboard_is_served_over_https_only(node: NodeProcess, pki: Pki) -> None:
    assert node.url.startswith("https://")
    assert httpx.get(f"{node.url}/healthz", verify=node.verify, timeout=10).status_code == 200
    with pytest.raises(httpx.ConnectError):  # a certificate no trusted CA signed
        httpx.get(f"{node.url}/healthz", timeout=10)
    with pytest.raises(httpx.TransportError):  # plain HTTP to the HTTPS port
        httpx.get(node.url.replace("https://", "http://") + "/healthz", timeout=10)
    settings = load_settings(node.config)
    db = open_database(settings.node.resolved_database_url)
    audit.configure(db, settings)  # the user's audit event joins the node's keyed chain
    try:
        make_user(db, "radiologist", "viewer")
    finally:
        db.dispose()
    with httpx.Client(base_url=node.url, verify=node.verify, timeout=10, follow_redirects=False) as client:
        web_login(client, "radiologist")  # type: ignore[arg-type]  # an httpx client, as TestClient is


@pytest.fixture(scope="module")
def orthanc(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """An Orthanc whose DICOM port speaks TLS only and wants a client certificate from the test CA."""
    cert, key = pki.server
    options = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(cert),
        "DicomTlsPrivateKey": str(key),
        "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
    }
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-tls"), options=options).start()
    yield server
    server.stop()


def _settings(pki: Pki, orthanc: OrthancServer, **destination: object) -> Settings:
    pacs = {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    return Settings.model_validate(
        {
            "tls": tls_section(pki),
            "destinations": [{**pacs, **destination}],
            "send": {"first_delay_seconds": 0},
        }
    )


def test_results_are_sent_to_orthanc_over_dicom_tls(
    db: Database, pki: Pki, orthanc: OrthancServer, tmp_path: Path
) -> None:
    settings = _settings(pki, orthanc, tls=True)
    assert echo(settings, settings.destination("pacs")) == 0
    arrival = instance(Spool(tmp_path))
    store(db, arrival, settings.study.model_copy(update={"stable_seconds": 0}))
    mark_stable(db, settings.study.model_copy(update={"stable_seconds": 0}))
    route_ready(db, ROUTES)
    with db.session() as session:
        job = session.scalars(select(Job)).one()
        result = Result(
            job=job, kind="SR", sop_uid=arrival.sop_uid, sop_class_uid=CTImageStorage, path=str(arrival.path)
        )
        session.add(Send(result=result, destination="pacs"))
    assert Sender(settings, db).run_due() == 1
    with db.session() as session:
        assert session.scalars(select(Send.status)).one() == SendStatus.SENT
    found = orthanc.client.post_tools_find(
        json={"Level": "Instance", "Query": {"SOPInstanceUID": arrival.sop_uid}}
    )
    assert len(found) == 1


def test_destinations_page_echoes_over_dicom_tls(
    db: Database, pki: Pki, orthanc: OrthancServer, tmp_path: Path
) -> None:
    operator = logged_in(db, Spool(tmp_path), "operator", _settings(pki, orthanc, tls=True))
    answer = operator.post("/destinations/pacs/echo", data={"csrf_token": csrf(operator)})
    assert f"C-ECHO ORTHANC@127.0.0.1:{orthanc.dicom_port}: success" in html.unescape(answer.text)


@pytest.mark.parametrize(
    "destination",
    [
        {"tls": False},  # plain DICOM to a TLS port
        {"tls": True, "tls_ca_file": "rogue"},  # Orthanc's certificate is not from the CA the node trusts
        {"tls": True, "tls_server_name": "pacs.example"},  # nor is it for the name the node expects
        {"tls": True, "tls_cert_file": "rogue"},  # the node shows a certificate Orthanc does not trust
    ],
    ids=["plain", "untrusted-ca", "wrong-name", "untrusted-node"],
)
def test_no_association_with_a_destination_the_node_cannot_trust(
    pki: Pki, orthanc: OrthancServer, destination: dict[str, object]
) -> None:
    if destination.get("tls_ca_file") == "rogue":
        destination = {**destination, "tls_ca_file": str(pki.rogue_ca)}
    if destination.get("tls_cert_file") == "rogue":
        cert, key = pki.rogue_client
        destination = {**destination, "tls_cert_file": str(cert), "tls_key_file": str(key)}
    settings = _settings(pki, orthanc, **destination)
    assert echo(settings, settings.destination("pacs")) == -1


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_plain_http_on_a_network_address_is_refused(tmp_path: Path, command: str) -> None:
    node = {"data_dir": str(tmp_path / "var"), "http_host": "0.0.0.0", "http_port": free_port()}
    config = tmp_path / "config.toml"
    config.write_bytes(tomli_w.dumps({"node": {**node, "dicom_port": free_port()}}).encode())
    run = subprocess.run(
        [sys.executable, "-m", "node.cli", command, "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert run.returncode == 2
    assert "node.http_host" in run.stderr and "tls.cert_file" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "var").exists()  # refused before anything started


def _key_copy(key: Path, folder: Path, mode: int) -> Path:
    copy = folder / f"key-{mode:o}.pem"
    copy.write_bytes(key.read_bytes())
    copy.chmod(mode)
    return copy


def test_unusable_tls_files_are_named_at_start(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.server

    def refusal(section: dict[str, object], **node: object) -> str:
        with pytest.raises(ConfigError) as error:
            tls.check(Settings.model_validate({"node": node, "tls": section}))
        return str(error.value)

    assert "tls.cert_file" in refusal({"cert_file": str(tmp_path / "missing.pem"), "key_file": str(key)})
    assert "tls.key_file" in refusal({"cert_file": str(cert)})
    mismatched = refusal({"cert_file": str(cert), "key_file": str(pki.client[1])})
    assert "tls.cert_file" in mismatched and "KEY_VALUES_MISMATCH" in mismatched
    readable = refusal({"cert_file": str(cert), "key_file": str(_key_copy(key, tmp_path, 0o604))})
    assert "chmod 600" in readable
    assert "tls.ca_file" in refusal({"cert_file": str(cert), "key_file": str(key), "dicom_port": 2762,
                                     "require_client_cert": True})  # fmt: skip
    assert "tls.cert_file" in refusal({"dicom_port": 2762})
    assert "tls.dicom_port" in refusal(tls_section(pki, dicom_port=11112), dicom_port=11112)
    destination = {"name": "pacs", "ae_title": "PACS", "host": "pacs", "port": 2762, "tls": True}
    with pytest.raises(ConfigError, match="destinations.pacs.tls_ca_file"):
        tls.check(
            Settings.model_validate({"destinations": [{**destination, "tls_ca_file": str(cert) + "x"}]})
        )


def test_a_key_its_group_may_read_is_used_with_a_warning(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = pki.server
    section = {"cert_file": str(cert), "key_file": str(_key_copy(key, tmp_path, 0o640))}
    with caplog.at_level(logging.WARNING, logger="node.dicom.tls"):
        tls.check(Settings.model_validate({"tls": section}))
    assert "group may read" in caplog.text


def test_tls_paths_are_relative_to_the_configuration_file(tmp_path: Path) -> None:
    destination = {"name": "pacs", "ae_title": "PACS", "host": "pacs", "port": 2762, "tls": True}
    settings = {
        "tls": {"cert_file": "certs/node.pem", "key_file": "certs/node.key", "ca_file": "certs/ca.pem"},
        "destinations": [{**destination, "tls_ca_file": "certs/pacs-ca.pem"}],
    }
    config = tmp_path / "etc" / "config.toml"
    config.parent.mkdir()
    config.write_bytes(tomli_w.dumps(settings).encode())
    loaded = load_settings(config, environ={})
    certs = config.parent / "certs"
    assert (loaded.tls.cert_file, loaded.tls.key_file, loaded.tls.ca_file) == (
        certs / "node.pem",
        certs / "node.key",
        certs / "ca.pem",
    )
    assert loaded.destinations[0].tls_ca_file == certs / "pacs-ca.pem"


def test_only_the_configured_cas_are_trusted(pki: Pki) -> None:
    """A CA file replaces the system's CAs, for senders' and destinations' certificates alike."""
    section = tls_section(pki, dicom_port=2762, require_client_cert=True)
    settings = Settings.model_validate({"tls": section})
    assert tls.server_context(settings.tls, client_certificates=True).cert_store_stats()["x509_ca"] == 1
    assert tls.server_context(settings.tls, client_certificates=False).verify_mode == ssl.CERT_NONE
    destination = {"name": "pacs", "ae_title": "PACS", "host": "pacs", "port": 2762, "tls": True}
    with_ca = Settings.model_validate({"destinations": [{**destination, "tls_ca_file": str(pki.rogue_ca)}]})
    context = tls.client_context(with_ca.tls, with_ca.destinations[0])
    assert [ca["subject"] for ca in context.get_ca_certs()] == [((("commonName", "rogue-ca"),),)]


def test_a_tls_record_left_unfinished_is_cut_and_audited(pki: Pki, tmp_path: Path) -> None:
    """A TLS peer that sends most of a record and stops: select sees bytes, the decrypting read waits for
    the rest. It is cut at the PDU deadline like a trickler on the plain port: an A-ABORT, an audit entry."""
    settings = {"node": {"pdu_seconds": 2}, "tls": tls_section(pki, dicom_port=free_port())}
    node = NodeProcess(tmp_path / "node", settings, ca=pki.ca).start()
    context = ssl.create_default_context(cafile=pki.ca)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    try:
        with socket.create_connection(("127.0.0.1", tls_port(node)), timeout=10) as sock:
            while True:
                try:
                    peer.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    sock.sendall(outgoing.read())
                    incoming.write(sock.recv(65536))
            sock.sendall(outgoing.read())
            peer.write(b"\x01\x00" + (100).to_bytes(4, "big") + bytes(100))  # an A-ASSOCIATE-RQ's length
            record = outgoing.read()
            sock.sendall(record[:-1])  # all but its last byte: nothing of it can be decrypted
            started = time.monotonic()
            while data := sock.recv(65536):
                incoming.write(data)
            waited = time.monotonic() - started
        answer = bytearray()
        with contextlib.suppress(ssl.SSLError):
            while chunk := peer.read(65536):
                answer += chunk
        assert waited < 6  # the deadline is 2 s; a bound on a hang
        assert answer[:1] == b"\x07", answer  # A-ABORT
        assert audited(node, "association.rejected")
    finally:
        node.stop()


def test_an_echo_whose_tls_files_went_missing_fails_instead_of_raising(pki: Pki, tmp_path: Path) -> None:
    """Files are checked at start; one removed later makes the Destinations page's C-ECHO fail (-1), not
    answer 500."""
    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port(), "tls": True}
    gone = tmp_path / "gone-ca.pem"
    settings = Settings.model_validate({"destinations": [{**destination, "tls_ca_file": str(gone)}]})
    assert echo(settings, settings.destination("pacs")) == -1
