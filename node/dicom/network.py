"""The node's Application Entities: one listening (Storage SCP, Verification SCP), one per send or echo.

Both are built here so that what every association needs — Nagle off on its socket, the timeouts, and
later a TLS context — is set in one place.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from pydicom import uid
from pynetdicom import AE, _config, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import NodeSettings

# What the listener accepts: uncompressed in every byte order, deflated, and the compressed syntaxes
# pydicom can decode with the pylibjpeg plugins, so a sender never has to transcode and the analysis
# can read what was stored.
RECEIVED_TRANSFER_SYNTAXES = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
]
# What the node's own results are written in (see node.outputs).
SENT_TRANSFER_SYNTAXES = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]


def set_nodelay(event: Any) -> None:
    """Small PDU writes stall ~40 ms each on Nagle + delayed ACK; turn Nagle off on every socket."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# Every association the node opens or accepts takes these handlers.
SOCKET_HANDLERS: list[EventHandlerType] = [(evt.EVT_CONN_OPEN, set_nodelay)]


def listening_ae(node: NodeSettings) -> AE:
    """The Storage and Verification SCP: every storage SOP class (private and future ones too) in
    :data:`RECEIVED_TRANSFER_SYNTAXES`, the node's AE title required, the calling-AE allow-list."""
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _config.LOG_HANDLER_LEVEL = "none"
    ae = AE(ae_title=node.ae_title)
    ae.require_called_aet = True
    ae.require_calling_aet = list(node.allowed_calling_aets)
    ae.maximum_associations = node.max_associations
    ae.network_timeout = node.network_timeout
    ae.maximum_pdu_size = 0
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, RECEIVED_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    return ae


def sending_ae(node: NodeSettings, sop_classes: Sequence[str] = (), timeout: float | None = None) -> AE:
    """An SCU for one association: the storage SOP classes to propose (none: Verification only)."""
    ae = AE(ae_title=node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = (
        timeout or node.network_timeout
    )
    for sop_class in sorted(set(sop_classes)):
        ae.add_requested_context(sop_class, SENT_TRANSFER_SYNTAXES)
    if not sop_classes:
        ae.add_requested_context(Verification)
    return ae
