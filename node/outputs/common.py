"""What the output writers share: who made the result, the sentences every result carries, and the
image a result about a whole series is shown on. (The character set is node.outputs.charset's.)"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from node.runtime.identity import DEFAULT_DISCLAIMER, ModelIdentity


def contributing_equipment(model: ModelIdentity) -> hd.ContributingEquipment:
    """The AI device as IHE AIR asks for it: Processing Equipment (DCM 109102) naming the model,
    its version and a Device UID that changes whenever the weights do."""
    item = hd.ContributingEquipment(
        manufacturer=model.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name,
        software_versions=model.software_version,
        contribution_description=f"AI model ({model.family}) that produced this result",
    )
    item.DeviceUID = model.device_uid  # highdicom has no argument for it; Type 3 in the item
    return item


def disclaimer_lines(model: ModelIdentity) -> list[str]:
    """The line NOT FOR DIAGNOSTIC USE on its own, then whatever else the model package says about
    itself (e.g. "Demonstration model trained on synthetic images")."""
    rest = model.disclaimer.replace(DEFAULT_DISCLAIMER, "").strip(" .;:-")
    return [DEFAULT_DISCLAIMER, rest] if rest else [DEFAULT_DISCLAIMER]


def not_analysed_text(reason: str) -> str:
    return f"NOT ANALYSED: {reason}"


def middle_image(sources: Sequence[Dataset]) -> Dataset:
    """The image in the middle of a series by Instance Number: where a result about the whole series
    (e.g. why it was not analysed) is shown."""
    ordered = sorted(sources, key=lambda ds: int(ds.get("InstanceNumber") or 0))
    return ordered[len(ordered) // 2]
