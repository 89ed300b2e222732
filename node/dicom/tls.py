"""DICOM TLS and HTTPS: every ssl context the node uses, built here from ``[tls]`` and each destination.

One place decides what "encrypted" means for both directions: TLS 1.2 at least, the ssl module's cipher
defaults, certificates checked against the configured CAs. :func:`check` builds them all at start so a
missing file, a key that is not the certificate's, or a key others may read stops the node with a
ConfigError that names the setting, instead of failing the first association.

The DICOM TLS listener does its handshake in the association's own thread, within the association
set-up deadline (:func:`listener_handlers`): pynetdicom's ``ssl_context`` would do it in the accepting
thread, where one silent client would stall every sender on the port.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from pynetdicom import evt
from pynetdicom.events import EventHandlerType

from node.config import ConfigError, Destination, Settings, TlsSettings
from node.dicom.limits import GuardedSocket

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
_T = TypeVar("_T")


def _check_key_file(key: str, path: Path) -> None:
    """Refuse a private key anyone on the machine may read; warn when a group may (Debian's ssl-cert
    group pattern is a deliberate choice, a world-readable key never is)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{key} {path}: {exc.strerror or exc}") from exc
    if mode & 0o007:
        raise ConfigError(f"{key} {path}: every user on this machine may read this private key; chmod 600 it")
    if mode & 0o070:
        log.warning("%s %s: the file's group may read this private key; chmod 600 it unless meant", key, path)


def _load(keys: str, action: Callable[[], _T]) -> _T:
    """Run a context's file loading; what goes wrong becomes a ConfigError naming ``keys``."""
    try:
        return action()
    except ssl.SSLError as exc:
        raise ConfigError(f"{keys}: not usable: {exc.reason or exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{keys}: {exc.strerror or exc}") from exc


def _load_identity(context: ssl.SSLContext, cert: Path | None, key: Path | None, prefix: str) -> None:
    """The certificate the node shows and its private key (both or neither)."""
    if cert is None and key is None:
        return
    if cert is None or key is None:
        raise ConfigError(f"{prefix}cert_file and {prefix}key_file go together: set both")
    _check_key_file(f"{prefix}key_file", key)
    _load(f"{prefix}cert_file {cert}, {prefix}key_file {key}", lambda: context.load_cert_chain(cert, key))


def server_context(tls: TlsSettings, client_certificates: bool) -> ssl.SSLContext:
    """The node as a TLS server: HTTPS (``client_certificates`` False: browsers log in instead) or the
    DICOM TLS listener, where a sender's certificate, if ``ca_file`` is set, must be one it vouches
    for — and must be shown at all with ``require_client_cert``."""
    if tls.cert_file is None:
        raise ConfigError("tls.cert_file and tls.key_file: the node's certificate is needed to serve TLS")
    # Not create_default_context: that would trust every CA of the system for client certificates too.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_identity(context, tls.cert_file, tls.key_file, "tls.")
    if not client_certificates:
        return context
    if tls.ca_file is not None:
        ca_file = tls.ca_file
        _load(f"tls.ca_file {ca_file}", lambda: context.load_verify_locations(cafile=ca_file))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    elif tls.require_client_cert:
        raise ConfigError("tls.require_client_cert needs tls.ca_file: the CAs senders' certificates are from")
    return context


def client_context(tls: TlsSettings, destination: Destination) -> ssl.SSLContext:
    """The node as a TLS client of ``destination``: its certificate checked against the destination's CAs
    (else ``[tls] ca_file``, else the system's), the node's own certificate shown where one is set."""
    prefix = f"destinations.{destination.name}."
    ca_file = destination.tls_ca_file or tls.ca_file
    what = f"{prefix}tls_ca_file" if destination.tls_ca_file else "tls.ca_file"
    # Given a CA file, only its CAs are trusted; else the system's.
    context = _load(f"{what} {ca_file}", lambda: ssl.create_default_context(cafile=ca_file))
    context.minimum_version = MINIMUM_VERSION
    if destination.tls_cert_file is not None or destination.tls_key_file is not None:
        _load_identity(context, destination.tls_cert_file, destination.tls_key_file, f"{prefix}tls_")
    else:
        _load_identity(context, tls.cert_file, tls.key_file, "tls.")
    return context


def tls_args(settings: Settings, destination: Destination) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for an association with ``destination``; None: plain TCP."""
    if not destination.tls:
        return None
    return client_context(settings.tls, destination), destination.tls_server_name or destination.host


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def check(settings: Settings) -> None:
    """Refuse a configuration that would send anything unencrypted off the machine by choice (the
    dashboard on a network address without HTTPS), and build every TLS context once. Plain DICOM on the
    network stays allowed: many modalities cannot do TLS. Raises ConfigError."""
    node, tls = settings.node, settings.tls
    if tls.cert_file is None and not _loopback(node.http_host):
        raise ConfigError(
            f"node.http_host = {node.http_host!r} is not a loopback address, and without tls.cert_file and "
            "tls.key_file the dashboard would send passwords and patient data unencrypted: set both "
            "(HTTPS), or keep node.http_host on 127.0.0.1 behind a TLS proxy"
        )
    if tls.cert_file is not None:
        server_context(tls, client_certificates=False)
    if tls.dicom_port:
        if tls.dicom_port == node.dicom_port and (tls.dicom_host or node.dicom_host) == node.dicom_host:
            raise ConfigError(
                f"tls.dicom_port {tls.dicom_port} is node.dicom_port: give TLS a port of its own"
            )
        server_context(tls, client_certificates=True)
    for destination in settings.destinations:
        tls_args(settings, destination)
    if settings.worklist.host and settings.worklist.tls:
        from node.dicom.worklist import server  # the worklist's SCU builds on this module

        tls_args(settings, server(settings))


class _GuardedTlsSocket(GuardedSocket, ssl.SSLSocket):  # type: ignore[misc]  # its recv calls SSLSocket.recv
    """A TLS connection under the listener's PDU deadline and size cap (node.dicom.limits): bytes
    OpenSSL has already decrypted are readable, though select cannot see them."""

    def _readable(self, timeout: float) -> bool:
        return self.pending() > 0 or super()._readable(timeout)


def listener_handlers(
    context: ssl.SSLContext, timeout: float, refused: Callable[[Any, str], None]
) -> list[EventHandlerType]:
    """Handlers that make a guarded listener (node.dicom.limits) a TLS one: each accepted connection
    is wrapped and its handshake done in the association's thread within ``timeout`` seconds; a
    connection whose handshake fails (plain DICOM, no or an untrusted certificate, TLS below 1.2,
    silence) is closed and reported to ``refused(event, reason)`` before any DICOM is read from it.
    One that succeeds is guarded as the plain socket was. Put them first: later handlers see the TLS
    socket."""
    context.sslsocket_class = _GuardedTlsSocket

    def handshake(event: Any) -> None:
        connection = event.assoc.dul.socket  # pynetdicom's AssociationSocket: its .socket is the TCP one
        plain: GuardedSocket = connection.socket
        plain.settimeout(timeout)
        try:
            secure = cast(
                _GuardedTlsSocket,
                context.wrap_socket(plain, server_side=True, do_handshake_on_connect=False),
            )
            connection.socket = secure
            secure.do_handshake()
        except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
            refused(event, f"TLS handshake failed: {getattr(exc, 'reason', None) or type(exc).__name__}")
            connection.close()
            event.assoc.acse_timeout = 0  # no A-ASSOCIATE-RQ can come: end now, not hold a slot
            return
        secure.watch(plain.guard, plain.peer)

    return [(evt.EVT_CONN_OPEN, handshake)]
