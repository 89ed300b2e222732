"""A copy of the audit log for the hospital's audit repository: DICOM audit messages (PS3.15 A.5,
the IHE ATNA format) over syslog (RFC 5424 messages, over UDP as RFC 5426 or TLS as RFC 5425).

The copy lives outside the node, so it also shows what the chain alone cannot: events removed from
the end of the log. Messages are built and sent by a thread of their own, after the transaction that
recorded the events has committed; a full queue or an unreachable repository drops messages (counted
and logged) and never holds up or fails the node's work. Only events with a DICOM audit meaning are
sent (see ``MESSAGES``); the node's internal steps (routing, jobs) stay in its own log.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import ssl
import threading
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from node.config import AuditSettings, Settings
from node.db import AuditEvent

log = logging.getLogger(__name__)

Code = tuple[str, str, str]  # csd-code, codeSystemName, originalText

# PS3.15 A.5.3 event IDs (CID 400) and PS3.16 event type codes (CID 401, 403, 404).
APPLICATION_ACTIVITY: Code = ("110100", "DCM", "Application Activity")
AUDIT_LOG_USED: Code = ("110101", "DCM", "Audit Log Used")
INSTANCES_ACCESSED: Code = ("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED: Code = ("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED: Code = ("110105", "DCM", "DICOM Study Deleted")
SECURITY_ALERT: Code = ("110113", "DCM", "Security Alert")
USER_AUTHENTICATION: Code = ("110114", "DCM", "User Authentication")
APPLICATION_START: Code = ("110120", "DCM", "Application Start")
APPLICATION_STOP: Code = ("110121", "DCM", "Application Stop")
LOGIN: Code = ("110122", "DCM", "Login")
LOGOUT: Code = ("110123", "DCM", "Logout")
NODE_AUTHENTICATION: Code = ("110126", "DCM", "Node Authentication")
SECURITY_CONFIGURATION: Code = ("110129", "DCM", "Security Configuration")
SOFTWARE_CONFIGURATION: Code = ("110131", "DCM", "Software Configuration")
SECURITY_ROLES_CHANGED: Code = ("110136", "DCM", "Security Roles Changed")
USER_SECURITY_ATTRIBUTES_CHANGED: Code = ("110137", "DCM", "User Security Attributes Changed")
STUDY_INSTANCE_UID: Code = ("110180", "DCM", "Study Instance UID")
APPLICATION: Code = ("110150", "DCM", "Application")
SOURCE: Code = ("110153", "DCM", "Source Role ID")
DESTINATION: Code = ("110152", "DCM", "Destination Role ID")


@dataclass(frozen=True)
class Message:
    """How one audit action is told in DICOM terms."""

    event_id: Code
    action_code: str  # EventActionCode: C create, R read, U update, D delete, E execute
    type_code: Code | None = None
    actor_role: Code | None = None  # the requestor's role; the node then takes the other one
    node_role: Code = APPLICATION


MESSAGES: dict[str, Message] = {
    "node.started": Message(APPLICATION_ACTIVITY, "E", APPLICATION_START),
    "node.stopped": Message(APPLICATION_ACTIVITY, "E", APPLICATION_STOP),
    "config.reloaded": Message(SECURITY_ALERT, "E", SOFTWARE_CONFIGURATION),
    "audit.keyed": Message(SECURITY_ALERT, "E", SECURITY_CONFIGURATION),
    "audit.viewed": Message(AUDIT_LOG_USED, "R"),
    "audit.exported": Message(AUDIT_LOG_USED, "R"),
    "user.login": Message(USER_AUTHENTICATION, "E", LOGIN),
    "user.logout": Message(USER_AUTHENTICATION, "E", LOGOUT),
    "user.added": Message(SECURITY_ALERT, "E", USER_SECURITY_ATTRIBUTES_CHANGED),
    "user.disabled": Message(SECURITY_ALERT, "E", USER_SECURITY_ATTRIBUTES_CHANGED),
    "user.enabled": Message(SECURITY_ALERT, "E", USER_SECURITY_ATTRIBUTES_CHANGED),
    "user.role_changed": Message(SECURITY_ALERT, "E", SECURITY_ROLES_CHANGED),
    "user.password_changed": Message(SECURITY_ALERT, "E", USER_SECURITY_ATTRIBUTES_CHANGED),
    "token.created": Message(SECURITY_ALERT, "E", USER_SECURITY_ATTRIBUTES_CHANGED),
    "token.revoked": Message(SECURITY_ALERT, "E", USER_SECURITY_ATTRIBUTES_CHANGED),
    "association.rejected": Message(SECURITY_ALERT, "E", NODE_AUTHENTICATION),
    "phi.viewed": Message(INSTANCES_ACCESSED, "R"),
    "study.deleted": Message(STUDY_DELETED, "D"),
    "instance.stored": Message(INSTANCES_TRANSFERRED, "C", actor_role=SOURCE, node_role=DESTINATION),
    "result.sent": Message(INSTANCES_TRANSFERRED, "R", node_role=SOURCE),
}

_OUTCOME = {"success": "0", "failure": "4"}  # 0 success, 4 minor failure (PS3.15 A.5.1)
CLOSE_SECONDS = 2.0  # how long closing a TLS connection waits for the repository's close_notify


@dataclass(frozen=True)
class Copy:
    """What a message needs of an event, taken in the committing thread (the ORM object is not
    shared with the sender's thread)."""

    id: int
    at: datetime
    action: str
    outcome: str
    actor: str
    study_uid: str
    detail: dict[str, Any] = field(default_factory=dict)


def _coded(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": code[1], "originalText": code[2]})


def _participant(parent: ET.Element, user: str, requestor: bool, role: Code, address: str = "") -> None:
    attributes = {"UserID": user, "UserIsRequestor": "true" if requestor else "false"}
    if address:
        attributes |= {"NetworkAccessPointID": address, "NetworkAccessPointTypeCode": "2"}  # 2: IP address
    _coded(ET.SubElement(parent, "ActiveParticipant", attributes), "RoleIDCode", role)


def audit_message(event: Copy, source_id: str, site_id: str = "") -> bytes | None:
    """The PS3.15 A.5 XML for ``event``, or None if it has no DICOM audit meaning."""
    kind = MESSAGES.get(event.action)
    if kind is None:
        return None
    root = ET.Element("AuditMessage")
    identification = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": kind.action_code,
            "EventDateTime": event.at.astimezone(UTC).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": _OUTCOME.get(event.outcome, "4"),
        },
    )
    _coded(identification, "EventID", kind.event_id)
    if kind.type_code is not None:
        _coded(identification, "EventTypeCode", kind.type_code)
    # The actor is "user:NAME", "token:NAME", an AE title, "http:ADDRESS" or "node".
    actor = event.actor.split(":", 1)[-1] if ":" in event.actor else event.actor
    address = str(event.detail.get("address") or event.detail.get("client") or "")  # DICOM or HTTP peer
    if event.actor != "node":
        _participant(root, actor, True, kind.actor_role or APPLICATION, address)
    _participant(root, source_id, event.actor == "node", kind.node_role)
    source = ET.SubElement(
        root,
        "AuditSourceIdentification",
        {"AuditSourceID": source_id} | ({"AuditEnterpriseSiteID": site_id} if site_id else {}),
    )
    _coded(source, "AuditSourceTypeCode", ("4", "DCM", "Application Server Process or Thread"))
    listed = event.detail.get("studies")  # a list page names several
    studies = [event.study_uid] if event.study_uid else []
    studies += [uid for uid in listed if isinstance(uid, str)] if isinstance(listed, list) else []
    for uid in studies:
        study = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            # 2: system object, 3: report (PS3.15 A.5.2.5 for a study)
            {
                "ParticipantObjectID": uid,
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "3",
            },
        )
        _coded(study, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
    return b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(
        root, encoding="utf-8", xml_declaration=False
    )


def syslog_message(xml: bytes, at: datetime, hostname: str, app_name: str = "ainode") -> bytes:
    """RFC 5424: PRI 85 (facility 10 security/authorization, severity 5 notice), version 1, the
    time, host, application, process, MSGID "IHE+RFC-3881" (ITI TF-2 3.20.4.1.2.2), no structured
    data. No byte-order mark before the XML: IHE (ITI CP 477) asks senders to leave it out."""
    stamp = at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    header = f"<85>1 {stamp} {hostname or '-'} {app_name} {os.getpid()} IHE+RFC-3881 - "
    return header.encode("ascii") + xml


class _Udp:
    """RFC 5426: one message per datagram, nothing kept between them."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)

    def send(self, message: bytes) -> None:
        self._sock.sendto(message, self._target)

    def close(self) -> None:
        self._sock.close()


class _Tls:
    """RFC 5425: one TLS connection, each message framed by its length; the repository's
    certificate is checked (``tls_ca_file``, else the system's CAs) and the node shows its own when
    given one (ATNA's mutual node authentication). A broken connection is opened again for the next
    message."""

    def __init__(self, settings: AuditSettings) -> None:
        self._target = (settings.syslog_host, settings.syslog_port)
        self._context = ssl.create_default_context(
            cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None
        )
        if settings.tls_cert_file is not None:
            self._context.load_cert_chain(
                settings.tls_cert_file, settings.tls_key_file if settings.tls_key_file else None
            )
        self._sock: ssl.SSLSocket | None = None

    def send(self, message: bytes) -> None:
        if self._sock is None:
            raw = socket.create_connection(self._target, timeout=10)
            self._sock = self._context.wrap_socket(raw, server_hostname=self._target[0])
        try:
            self._sock.sendall(f"{len(message)} ".encode() + message)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        """End the connection with TLS's close_notify, as RFC 5425 4.4 asks, and read the repository's
        answer: a socket closed with data unread (TLS 1.3's session tickets) is reset, not ended, which
        may cost a repository the last messages it had not yet read (a logout seen lost once in CI)."""
        if self._sock is None:
            return
        sock, self._sock = self._sock, None
        try:
            sock.settimeout(CLOSE_SECONDS)
            sock.unwrap()
        except (OSError, ValueError):  # the repository closed first or never answers: nothing more to do
            pass
        finally:
            sock.close()


class SyslogForwarder:
    """Sends audit messages to the repository from a thread of its own; :meth:`__call__` only queues."""

    def __init__(self, settings: Settings, capacity: int = 10_000) -> None:
        audit = settings.audit
        self._where = f"{audit.syslog_transport}://{audit.syslog_host}:{audit.syslog_port}"
        self._transport = (
            _Tls(audit) if audit.syslog_transport == "tls" else _Udp(audit.syslog_host, audit.syslog_port)
        )
        self._source_id = audit.audit_source_id or settings.node.ae_title
        self._site_id = audit.enterprise_site_id
        self._hostname = socket.getfqdn()[:255].replace(" ", "-")
        self._queue: queue.Queue[Copy | None] = queue.Queue(capacity)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="ainode-audit-forward", daemon=True)
        self._thread.start()

    def __call__(self, events: Sequence[AuditEvent]) -> None:
        for event in events:
            copy = Copy(
                event.id,
                event.at,
                event.action,
                event.outcome,
                event.actor,
                event.study_uid,
                dict(event.detail),
            )
            try:
                self._queue.put_nowait(copy)
            except queue.Full:
                self.dropped += 1
                if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                    log.warning("audit forwarding queue full: %d event(s) not forwarded so far", self.dropped)

    def _run(self) -> None:
        try:
            while (copy := self._queue.get()) is not None:
                try:
                    xml = audit_message(copy, self._source_id, self._site_id)
                    if xml is not None:
                        self._transport.send(syslog_message(xml, copy.at, self._hostname))
                except OSError as exc:  # the repository is down or unknown: this copy is lost
                    self.dropped += 1
                    log.warning("could not forward audit event %d to %s: %s", copy.id, self._where, exc)
                except Exception:
                    self.dropped += 1
                    log.exception("could not forward audit event %d", copy.id)
        finally:
            self._transport.close()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to ``timeout`` seconds), then stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)
