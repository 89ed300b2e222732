"""Which model produced a result: written into every SR, SC and audit entry."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

MANUFACTURER = "AI node project"
_DEVICE_NAMESPACE = uuid.UUID("5d0c3a5e-8a4f-4c1e-9a57-6b1f0e2d7c11")  # fixed: same weights, same UID
DEFAULT_DISCLAIMER = "NOT FOR DIAGNOSTIC USE"


@dataclass(frozen=True)
class ModelIdentity:
    """A model package as the results and the audit log name it."""

    name: str
    version: str
    sha256: str  # of the weights file
    family: str  # e.g. "ResNet50 classifier"
    disclaimer: str = DEFAULT_DISCLAIMER
    manufacturer: str = MANUFACTURER

    @property
    def device_uid(self) -> str:
        """The AI device UID (IHE AIR): stable for one set of weights, new when they change."""
        key = "\0".join((self.name, self.version, self.sha256))
        return f"2.25.{uuid.uuid5(_DEVICE_NAMESPACE, key).int}"

    @property
    def software_version(self) -> str:
        return f"{self.version} (sha256 {self.sha256[:12]})"
