"""The audit log's copy for the hospital's audit repository: DICOM audit messages (PS3.15 A.5) in
RFC 5424 syslog over UDP or TLS, received by a syslog listener the test runs."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from node import audit
from node.config import Settings
from node.db import Database
from tests.peers import NodeProcess

HEADER = re.compile(
    rb"<85>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (\S+) ainode (\d+) IHE\+RFC-3881 - (<\?xml .*)", re.S
)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(10)
        yield sock


def _settings(tmp_path: Path, port: int, host: str = "127.0.0.1") -> Settings:
    return Settings.model_validate(
        {
            "node": {"data_dir": str(tmp_path), "ae_title": "AINODE_T"},
            "audit": {"syslog_host": host, "syslog_port": port, "enterprise_site_id": "HOSPITAL"},
        }
    )


def _receive(sock: socket.socket, count: int) -> list[ET.Element]:
    messages = []
    for _ in range(count):
        datagram, _ = sock.recvfrom(65535)
        match = HEADER.fullmatch(datagram)
        assert match, datagram[:200]
        messages.append(ET.fromstring(match.group(4)))
    return messages


def _event(message: ET.Element) -> ET.Element:
    found = message.find("EventIdentification")
    assert found is not None
    return found


def _code(element: ET.Element | None) -> tuple[str, str, str]:
    assert element is not None
    return element.get("csd-code", ""), element.get("codeSystemName", ""), element.get("originalText", "")


def test_events_reach_a_syslog_listener_as_dicom_audit_messages(
    db: Database, tmp_path: Path, listener: socket.socket
) -> None:
    audit.configure(db, _settings(tmp_path, listener.getsockname()[1]))
    audit.append(db, "user.login", actor="user:alice", client="10.1.2.3")  # as node.accounts records it
    audit.append(db, "job.started", study_uid="1.2.3", job=1)  # the node's own step: not sent
    audit.append(db, "phi.viewed", actor="user:alice", study_uid="1.2.3", what="study detail")
    audit.append(db, "phi.viewed", actor="user:bob", what="studies list", studies=["1.2.3", "1.2.4"])
    audit.append(db, "study.deleted", actor="user:admin", study_uid="1.2.3")
    audit.append(db, "user.login", actor="user:mallory", outcome="failure", client="10.6.6.6")
    audit.close(db)

    keyed, login, viewed, listed, deleted, failed = _receive(listener, 6)
    assert _code(keyed.find("EventIdentification/EventID")) == ("110113", "DCM", "Security Alert")
    event = _event(login)
    assert event.get("EventOutcomeIndicator") == "0"
    assert _code(event.find("EventID")) == ("110114", "DCM", "User Authentication")
    assert _code(event.find("EventTypeCode")) == ("110122", "DCM", "Login")
    requestor, node = login.findall("ActiveParticipant")
    assert requestor.attrib == {
        "UserID": "alice",
        "UserIsRequestor": "true",
        "NetworkAccessPointID": "10.1.2.3",
        "NetworkAccessPointTypeCode": "2",
    }
    assert node.get("UserID") == "AINODE_T" and node.get("UserIsRequestor") == "false"
    source = login.find("AuditSourceIdentification")
    assert source is not None and source.attrib == {
        "AuditSourceID": "AINODE_T",
        "AuditEnterpriseSiteID": "HOSPITAL",
    }

    assert _code(viewed.find("EventIdentification/EventID"))[0] == "110103"  # DICOM Instances Accessed
    assert _event(viewed).get("EventActionCode") == "R"
    study = viewed.find("ParticipantObjectIdentification")
    assert study is not None and study.get("ParticipantObjectID") == "1.2.3"
    assert _code(study.find("ParticipantObjectIDTypeCode")) == ("110180", "DCM", "Study Instance UID")
    assert [p.get("ParticipantObjectID") for p in listed.findall("ParticipantObjectIdentification")] == [
        "1.2.3",
        "1.2.4",
    ]

    assert _code(deleted.find("EventIdentification/EventID")) == ("110105", "DCM", "DICOM Study Deleted")
    assert _event(deleted).get("EventActionCode") == "D"
    assert _event(failed).get("EventOutcomeIndicator") == "4"
    listener.settimeout(0.5)
    with pytest.raises(TimeoutError):
        listener.recvfrom(65535)  # job.started was not sent
    assert audit.verify(db) is None


def test_an_unreachable_repository_never_fails_the_transaction(db: Database, tmp_path: Path) -> None:
    audit.configure(db, _settings(tmp_path, 514, host="audit-repository.invalid"))
    audit.append(db, "user.login", actor="user:alice")
    forwarder = audit._bindings[db.engine].forward
    audit.close(db)
    assert forwarder is not None and forwarder.dropped == 2  # the marker and the login, both lost
    assert audit.check(db).events == 2  # committed all the same


def _certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, made by openssl for this test."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_transport_frames_each_message_and_both_sides_authenticate(db: Database, tmp_path: Path) -> None:
    repository_cert, repository_key = _certificate(tmp_path, "repository")
    node_cert, node_key = _certificate(tmp_path, "node")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(node_cert))
    context.load_cert_chain(repository_cert, repository_key)
    context.verify_mode = ssl.CERT_REQUIRED  # ATNA: the node shows its certificate too
    received: list[bytes] = []
    peer: list[str] = []
    ended: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as server:

        def serve() -> None:
            connection, _ = server.accept()
            # Ragged EOFs raise: RFC 5425 4.4 wants a closure alert before the connection closes.
            with context.wrap_socket(connection, server_side=True, suppress_ragged_eofs=False) as tls:
                shown = tls.getpeercert()
                assert shown is not None
                peer.append(repr(shown["subject"]))
                data = b""
                try:
                    while chunk := tls.recv(65536):
                        data += chunk
                    ended.append("close_notify")
                except OSError as exc:
                    ended.append(repr(exc))
            received.append(data)

        thread = threading.Thread(target=serve)
        thread.start()
        settings = _settings(tmp_path, server.getsockname()[1], host="localhost")
        settings.audit.syslog_transport = "tls"
        settings.audit.tls_ca_file = repository_cert
        settings.audit.tls_cert_file, settings.audit.tls_key_file = node_cert, node_key
        audit.configure(db, settings)
        audit.append(db, "user.logout", actor="user:alice", client="10.1.2.3")
        audit.close(db)  # sends the queue, then closes the connection
        thread.join(30)
    assert "('commonName', 'node')" in peer[0]
    assert ended == ["close_notify"]
    data, messages = received[0], []
    while data:  # RFC 5425 octet counting: "LENGTH SP MESSAGE", again and again
        length, _, rest = data.partition(b" ")
        messages.append(rest[: int(length)])
        data = rest[int(length) :]
    assert len(messages) == 2  # the keying, then the logout
    match = HEADER.fullmatch(messages[1])
    assert match, messages[1][:200]
    event = _event(ET.fromstring(match.group(4)))
    assert _code(event.find("EventTypeCode")) == ("110123", "DCM", "Logout")


def test_the_running_node_keys_its_chain_and_forwards_its_start_and_stop(
    tmp_path: Path, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    node = NodeProcess(tmp_path / "node", {"audit": {"syslog_host": "127.0.0.1", "syslog_port": port}})
    node.start()  # its harness token is made first, keyed, in this process
    try:
        assert httpx.get(f"{node.url}/api/studies/1.2.3", headers=node.headers, timeout=10).status_code == 404
    finally:
        node.stop()
    actions = []
    for message in _receive(listener, 4):
        event = _event(message)
        actions.append((_code(event.find("EventID"))[0], _code(event.find("EventTypeCode"))[2]))
    assert actions == [
        ("110113", "Security Configuration"),  # the chain keyed, by the harness making its token ...
        ("110113", "User Security Attributes Changed"),  # ... and the token
        ("110100", "Application Start"),
        ("110100", "Application Stop"),
    ]
    key = tmp_path / "node" / "var" / "audit.key"
    assert key.stat().st_mode & 0o777 == 0o600
    db = Database(f"sqlite:///{tmp_path / 'node' / 'var' / 'ainode.db'}")
    try:
        state = audit.check(db, audit.read_key(key))
    finally:
        db.dispose()
    assert state.broken is None and state.keyed_from == 1  # the harness's token came after the key
