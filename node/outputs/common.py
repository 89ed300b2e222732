"""What the output writers share: who made the result, the sentences every result carries, and the
character set its text is written in."""

from __future__ import annotations

import highdicom as hd
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes

from node.outputs.registry import OutputContext
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


def character_set(context: OutputContext) -> str | MultiValue | None:
    """The sources' Specific Character Set, in which their patient names are written, unless the
    text the result adds is not plain ASCII (which every character set has): then UTF-8."""
    analysis, model = context.analysis, context.model
    texts = [
        context.series_description,
        analysis.task,
        analysis.not_analysed_reason or "",
        *(finding.concept.meaning for finding in analysis.findings),
        *(explanation.label for explanation in analysis.explanations),
        model.name,
        model.version,
        model.family,
        model.disclaimer,
        model.manufacturer,
    ]
    if all(text.isascii() for text in texts):
        return analysis.sources[0].get("SpecificCharacterSet")
    return "ISO_IR 192"
