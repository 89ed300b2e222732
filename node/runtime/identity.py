"""Which model produced a result: written into every SR, SC and audit entry."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import generate_uid

MANUFACTURER = "AI node project"
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
        return generate_uid(prefix=None, entropy_srcs=[self.name, self.version, self.sha256])

    @property
    def software_version(self) -> str:
        return f"{self.version} (sha256 {self.sha256[:12]})"
