"""C-STOREs taken below pynetdicom's message layer, in the listener's DUL thread (issue 12).

pynetdicom turns every P-DATA-TF PDU into PDV objects and a P-DATA primitive, passes it through its
state machine to a DIMSE message that writes each fragment (flushing it), decodes the command set with
pydicom, hands the request to the association thread through a queue, and builds and encodes the
response through pydicom datasets: about 1.3 ms of one core for a 512 KB instance, more than the
durable write. Here, while the association is established, a P-DATA-TF PDU's PDV items are read by
hand; once a command set is complete and it is a C-STORE-RQ on an accepted storage context, its data
set's fragments go straight to the file the listener receives into (the same preamble and meta
information pynetdicom's chunked receive writes: node.dicom.network.receive_to_disk), the handlers
bound to ``EVT_C_STORE`` run as pynetdicom's Storage SCP runs them, and the C-STORE-RSP is encoded by
hand and sent.

Anything else — a C-ECHO, a command set this does not take, a context not accepted, PDV items that do
not add up, a PDU in another state — goes to pynetdicom, whole and in order, with any PDUs of the
command set held back so far: pynetdicom then acts on it as it always has (its refusals and aborts
included). The decision is made per message. Low-level notification events (``EVT_DATA_RECV``,
``EVT_PDU_RECV``, ``EVT_DIMSE_RECV``, ``EVT_DIMSE_SENT``) are not fired for the messages taken here;
the node binds none that matter to a C-STORE taken here (``contain_failures`` checks requests this
takes only when they are valid).
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import IO, Any, cast

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import _config, dimse_messages, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from node.dicom import filemeta

log = logging.getLogger(__name__)

P_DATA_PDU = 0x04
_COMMAND, _LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)
_C_STORE_RQ, _C_STORE_RSP = 0x0001, 0x8001
_NO_DATA_SET = 0x0101
_HANDLER_FAILED = 0xC211  # what pynetdicom answers when an EVT_C_STORE handler raises
# Command elements (group 0000) read from a C-STORE-RQ
_SOP_CLASS, _FIELD, _MESSAGE_ID, _PRIORITY, _DATA_SET_TYPE, _SOP_INSTANCE = (
    0x0002,
    0x0100,
    0x0110,
    0x0700,
    0x0800,
    0x1000,
)
_MOVE_AE, _MOVE_MESSAGE_ID = 0x1030, 0x1031
_STATUS_ONLY = {"Status", "ErrorComment"}  # a handler's status data set the response here encodes


@dataclass
class _Store:
    """The C-STORE whose data set is being received."""

    request: C_STORE
    context: PresentationContext
    file: IO[bytes]


class StoreFastPath:
    """One association's C-STOREs, taken from the PDUs its DUL thread reads (see the module).
    ``dul`` is the association's node.dicom.network.PromptDUL: ``deliver`` hands it a PDU for
    pynetdicom; ``broken`` ends the association for a message this cannot go on with (A-ABORT,
    partial data set deleted, audited), as node.dicom.network.contain_failures does."""

    def __init__(self, dul: Any, broken: Callable[[Exception], None]) -> None:
        self._dul = dul
        self._assoc = dul.assoc
        self._broken = broken
        self._held: list[bytes] = []  # the PDUs of a command set not complete yet, as read
        self._command = bytearray()
        self._store: _Store | None = None

    def take(self, header: bytearray, body: bytearray) -> None:
        """A whole PDU read (``header``: its 6 bytes): taken here, or handed to pynetdicom."""
        if self._store is not None and self._dul.state_machine.current_state != "Sta6":
            self.discard()  # released or aborted meanwhile: pynetdicom ends it
        busy = self._store is not None or self._held
        pdvs = _pdvs(body) if header[0] == P_DATA_PDU and (busy or self._may_start()) else None
        if pdvs is None:
            self.discard()
            self._hand_over(header + body)
            return
        try:
            self._take(header, body, pdvs)
        except Exception as exc:  # a file that cannot be written (disk full): as pynetdicom's DT-2 failing
            self._broken(exc)

    def _may_start(self) -> bool:
        """Whether pynetdicom is between messages, with nothing of the peer's still to act on."""
        dul = self._dul
        return (
            dul.state_machine.current_state == "Sta6"
            and self._assoc.dimse.message is None
            and dul.event_queue.empty()
        )

    def _take(self, header: bytearray, body: bytearray, pdvs: list[tuple[int, int, int, int]]) -> None:
        view = memoryview(body)
        for context_id, control, start, end in pdvs:
            store = self._store
            if store is not None:
                if control & _COMMAND:
                    raise ValueError("a command fragment inside a data set")
                store.file.write(view[start:end])
                if control & _LAST:  # what follows in this PDU pynetdicom would drop too
                    self._finish(store)
                    return
                continue
            if not control & _COMMAND:  # a data set with no command before it: pynetdicom's to judge
                self._hand_over(header + body)
                return
            self._command += view[start:end]
            if not control & _LAST:
                continue
            request = _store_request(bytes(self._command), context_id, self._assoc)
            if request is None:
                self._hand_over(header + body)
                return
            self._held.clear()
            self._command.clear()
            self._store = self._begin(*request)
        if self._store is None:
            self._held.append(bytes(header + body))

    def _hand_over(self, pdu: bytes | bytearray) -> None:
        """``pdu`` to pynetdicom, after the PDUs of the command set held back."""
        for held in self._held:
            self._dul.deliver(held)
        self._held.clear()
        self._command.clear()
        self._dul.deliver(pdu)

    def _begin(self, request: C_STORE, context: PresentationContext) -> _Store:
        """The file the data set is received into, begun as pynetdicom's chunked receive begins it."""
        file = cast(IO[bytes], dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm"))
        request._dataset_path = Path(file.name)
        request._dataset_file = file  # type: ignore[assignment]
        sop_class, sop_instance = (
            cast(UID, request.AffectedSOPClassUID),
            cast(UID, request.AffectedSOPInstanceUID),
        )
        syntax = context.transfer_syntax[0]
        head = filemeta.received(sop_class, sop_instance, syntax, received_titles(self._assoc))
        if head is not None:  # what the listener's writer (node.dicom.network.receive_to_disk) writes
            file.write(filemeta.PREAMBLE + head)
        else:  # what pydicom's writer must decide: the listener's writer itself
            file.write(filemeta.PREAMBLE)
            meta = create_file_meta(
                sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax
            )
            dimse_messages.write_file_meta_info(file, meta)  # type: ignore[arg-type]
        return _Store(request, context, file)

    def _finish(self, store: _Store) -> None:
        """The handlers bound to EVT_C_STORE run, as pynetdicom's Storage SCP runs them, and are answered."""
        self._store = None
        store.file.close()
        assoc, request = self._assoc, store.request
        assoc.abort = assoc._abort_nonblocking  # as pynetdicom's ``attempt``: a handler may abort
        try:
            status: Any = evt.trigger(
                assoc, evt.EVT_C_STORE, {"request": request, "context": store.context.as_tuple}
            )
        except Exception as exc:
            log.error("Exception in handler bound to 'evt.EVT_C_STORE': %s", type(exc).__name__)
            status = _HANDLER_FAILED
        finally:
            assoc.abort = assoc._abort_blocking
            Path(store.file.name).unlink(missing_ok=True)  # adopted into the spool, or not kept
        # pynetdicom answers only an association still established; this can take a C-STORE before the
        # association thread has marked it so (a quick sender's first), so it asks the state machine
        ended = assoc.is_aborted or assoc.is_released or assoc._sent_abort
        if ended or self._dul.state_machine.current_state != "Sta6":
            return
        for pdu in _response(request, status, cast(int, store.context.context_id), assoc):
            self._dul.socket.send(pdu)

    def discard(self) -> None:
        """Delete the file of a data set not received whole (the connection ended, was aborted)."""
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(OSError):
                store.file.close()
            Path(store.file.name).unlink(missing_ok=True)


def received_titles(assoc: Any) -> tuple[str, str, str]:
    """The AE titles a received file's meta information names, as the node's spool files do
    (node.ingest.accept): who wrote it (the node), who sent it, to whom."""
    called = assoc.acceptor.ae_title.strip()
    return called, assoc.requestor.ae_title.strip(), called


def _pdvs(body: bytearray) -> list[tuple[int, int, int, int]] | None:
    """A P-DATA-TF PDU's PDV items: context ID, message control header, where the fragment begins and
    ends in ``body``; None where they do not fill it exactly."""
    items = []
    offset, size = 0, len(body)
    while offset < size:
        if offset + 6 > size:
            return None
        length, context_id, control = struct.unpack_from(">LBB", body, offset)
        end = offset + 4 + length
        if length < 2 or end > size:
            return None
        items.append((context_id, control, offset + 6, end))
        offset = end
    return items or None


def _elements(encoded: bytes) -> dict[int, bytes] | None:
    """A command set (implicit VR little endian, group 0000) by element number; None if malformed."""
    elements = {}
    offset, size = 0, len(encoded)
    while offset < size:
        if offset + 8 > size:
            return None
        group, element, length = struct.unpack_from("<HHL", encoded, offset)
        offset += 8
        if group != 0 or offset + length > size:
            return None
        elements[element] = encoded[offset : offset + length]
        offset += length
    return elements


def _us(value: bytes | None) -> int | None:
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


def _text(value: bytes) -> str:
    return value.decode("ascii").rstrip("\x00 ")


def _store_request(encoded: bytes, context_id: int, assoc: Any) -> tuple[C_STORE, PresentationContext] | None:
    """The C-STORE request and context of a command set this takes: a valid C-STORE-RQ with a data
    set, on an accepted context of the Storage Service; else None (pynetdicom's to act on)."""
    elements = _elements(encoded)
    context = assoc._accepted_cx.get(context_id)
    if elements is None or context is None or assoc._sent_release or assoc.acceptor.accepted_common_extended:
        return None
    if _us(elements.get(_FIELD)) != _C_STORE_RQ or _us(elements.get(_DATA_SET_TYPE)) in (None, _NO_DATA_SET):
        return None
    request = C_STORE()
    try:
        request.MessageID = cast(int, _us(elements.get(_MESSAGE_ID)))
        sop_class = request.AffectedSOPClassUID = UID(_text(elements[_SOP_CLASS]))
        request.AffectedSOPInstanceUID = UID(_text(elements[_SOP_INSTANCE]))
        if _PRIORITY in elements:
            request.Priority = cast(int, _us(elements[_PRIORITY]))
        if _MOVE_AE in elements:
            request.MoveOriginatorApplicationEntityTitle = _text(elements[_MOVE_AE])
        if _MOVE_MESSAGE_ID in elements:
            request.MoveOriginatorMessageID = _us(elements[_MOVE_MESSAGE_ID])
    except Exception:  # missing, or a value pynetdicom refuses: its own decoder says how
        return None
    request.DataSet = BytesIO()  # as pynetdicom's chunked receive leaves it: the data set is in the file
    request._context_id = context_id
    storage = _config.UNRESTRICTED_STORAGE_SERVICE or (uid_to_service_class(sop_class) is StorageServiceClass)
    if not (storage and request.is_valid_request and request.AffectedSOPInstanceUID):
        return None
    return request, context


def _response(request: C_STORE, status: Any, context_id: int, assoc: Any) -> list[bytes]:
    """The C-STORE-RSP to ``request`` as P-DATA-TF PDUs within the peer's maximum length: encoded
    here for a status (an int, or a data set of Status and Error Comment), else by pynetdicom."""
    code, comment = status, ""
    if isinstance(status, Dataset) and "Status" in status and set(status.dir()) <= _STATUS_ONLY:
        comment = str(status.get("ErrorComment", ""))
        plain = comment.isascii() and (comment or "ErrorComment" not in status)
        code = status.Status if plain else None
    maximum = assoc.requestor.maximum_length
    if type(code) is not int or not 0 <= code <= 0xFFFF:  # anything else as pynetdicom answers it
        return _pynetdicom_response(request, status, context_id, assoc, maximum)
    elements = [
        (_SOP_CLASS, _padded(str(request.AffectedSOPClassUID), b"\x00")),
        (_FIELD, struct.pack("<H", _C_STORE_RSP)),
        (0x0120, struct.pack("<H", request.MessageID)),  # Message ID Being Responded To
        (_DATA_SET_TYPE, struct.pack("<H", _NO_DATA_SET)),
        (0x0900, struct.pack("<H", code)),
        *([(0x0902, _padded(comment, b" "))] if comment else []),  # Error Comment
        (_SOP_INSTANCE, _padded(str(request.AffectedSOPInstanceUID), b"\x00")),
    ]
    body = b"".join(struct.pack("<HHL", 0, element, len(value)) + value for element, value in elements)
    command = struct.pack("<HHLL", 0, 0, 4, len(body)) + body  # Command Group Length first
    step = maximum - 6 if maximum else len(command)  # as pynetdicom fragments a command set
    pieces = [command[at : at + step] for at in range(0, len(command), step)]
    return [
        struct.pack(">BBLLBB", P_DATA_PDU, 0, len(piece) + 6, len(piece) + 2, context_id, control) + piece
        for piece, control in zip(pieces, [_COMMAND] * (len(pieces) - 1) + [_COMMAND | _LAST], strict=True)
    ]


def _padded(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _pynetdicom_response(
    request: C_STORE, status: Any, context_id: int, assoc: Any, maximum: int
) -> list[bytes]:
    """What pynetdicom's Storage SCP sends for any other status a handler returns."""
    response = C_STORE()
    response.MessageIDBeingRespondedTo = request.MessageID
    response.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
    response.AffectedSOPClassUID = request.AffectedSOPClassUID
    response = StorageServiceClass(assoc).validate_status(status, response)
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    return [P_DATA_TF(data).encode() for data in message.encode_msg(context_id, maximum)]
