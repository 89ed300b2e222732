"""The ``sc`` output: Secondary Capture overlays, the one result every PACS viewer displays.

Each image is the Grad-CAM heatmap blended over what the model saw, with a caption band added
below it (never over the anatomy) that says what was found, by which model, and that the result
is not for diagnostic use. The caption is burned in, so it survives any viewer.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from handlers.base import Explanation, Finding
from node.dicom.attributes import laterality, patient_orientation
from node.dicom.display import display_rgb8
from node.outputs.common import character_set, contributing_equipment, disclaimer_lines, not_analysed_text
from node.outputs.registry import OutputContext, register_output
from node.runtime.identity import ModelIdentity

_MIN_WIDTH = 512  # narrower images are enlarged so that the caption stays legible
_HEAT_ALPHA = 0.5  # opacity of the heatmap where it is 1; it fades out with the heat
_FONT = cv2.FONT_HERSHEY_SIMPLEX
Colour = tuple[int, int, int]
_WHITE: Colour = (255, 255, 255)
_YELLOW: Colour = (255, 220, 0)
_GREY: Colour = (128, 128, 128)


@register_output("sc", kind="SC", series_number=9000, series_description="AI overlay: {task}")
def secondary_captures(context: OutputContext) -> list[Dataset]:
    """One SC per explanation, all in one new series of the source study. A series that was not
    analysed gets one SC of its middle image saying why, so the reader is never left guessing."""
    analysis, model = context.analysis, context.model
    if analysis.analysed:
        pages = [
            (
                explanation.source,
                _overlay(explanation),
                (_finding_text(explanation, analysis.findings), _WHITE),
                f"Grad-CAM heatmap of {explanation.label} over the model input; caption burned in",
            )
            for explanation in analysis.explanations
        ]
    else:
        source = _middle(analysis.sources)
        reason = (not_analysed_text(analysis.not_analysed_reason or ""), _YELLOW)
        pages = [
            (source, display_rgb8(source), reason, "Middle source image, not analysed; caption burned in")
        ]
    series_uid, charset = generate_uid(), character_set(context)
    return [
        _secondary_capture(
            source,
            _with_caption(image, _caption(analysis.task, verdict, model)),
            derivation,
            context=context,
            series_uid=series_uid,
            instance_number=number,
            charset=charset,
        )
        for number, (source, image, verdict, derivation) in enumerate(pages, start=1)
    ]


def _caption(task: str, verdict: tuple[str, Colour], model: ModelIdentity) -> list[tuple[str, Colour]]:
    return [
        (task, _WHITE),
        verdict,
        (f"Model: {model.name} {model.version}", _WHITE),
        *[(line, _YELLOW) for line in disclaimer_lines(model)],
    ]


def _finding_text(explanation: Explanation, findings: Sequence[Finding]) -> str:
    """The series-level verdict for the explained label, and the probability on this image."""
    matches = [f for f in findings if f.concept.meaning.casefold() == explanation.label.casefold()]
    finding = matches[0] if matches else (findings[0] if len(findings) == 1 else None)
    if finding is None:
        return f"{explanation.label}: probability {explanation.probability:.2f} on this image"
    verdict = "PRESENT" if finding.present else "ABSENT"
    return (
        f"{finding.concept.meaning}: {verdict}, probability {finding.probability:.2f} "
        f"(this image {explanation.probability:.2f})"
    )


def _overlay(explanation: Explanation) -> np.ndarray:
    """JET heatmap over the image, opaque where the heat is high and clear where it is low, so that
    the anatomy around a hot spot stays readable."""
    heat = np.clip(explanation.heatmap.astype(np.float32), 0.0, 1.0)
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    alpha = (_HEAT_ALPHA * heat)[..., None]
    blended = explanation.image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha
    return np.round(blended).astype(np.uint8)


def _middle(sources: Sequence[Dataset]) -> Dataset:
    ordered = sorted(sources, key=lambda ds: int(ds.get("InstanceNumber") or 0))
    return ordered[len(ordered) // 2]


def _with_caption(image: np.ndarray, lines: Sequence[tuple[str, Colour]]) -> np.ndarray:
    """Enlarge a small image to at least 512 px wide and add a black caption band below it, set off
    by a grey rule so that it never reads as part of a dark image."""
    height, width = image.shape[:2]
    if width < _MIN_WIDTH:
        size = (_MIN_WIDTH, round(height * _MIN_WIDTH / width))
        image = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
        height, width = image.shape[:2]
    scale = 0.6 * width / _MIN_WIDTH
    thickness = max(1, round(1.5 * width / _MIN_WIDTH))
    margin = round(10 * width / _MIN_WIDTH)
    (_, text_height), baseline = cv2.getTextSize("Ag", _FONT, scale, thickness)
    line_height = round((text_height + baseline) * 1.5)
    wrapped = [
        (part, colour)
        for text, colour in lines
        for part in _wrap(_ascii(text), width - 2 * margin, scale, thickness)
    ]
    band = np.zeros((margin + line_height * len(wrapped) + margin, width, 3), np.uint8)
    band[:thickness] = _GREY
    for row, (text, colour) in enumerate(wrapped):
        origin = (margin, margin + text_height + row * line_height)
        cv2.putText(band, text, origin, _FONT, scale, colour, thickness, cv2.LINE_AA)
    return np.ascontiguousarray(np.vstack([image, band]))


def _wrap(text: str, max_width: int, scale: float, thickness: int) -> list[str]:
    """Break text at spaces so that each line fits; a single over-long word gets a line of its own."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and cv2.getTextSize(candidate, _FONT, scale, thickness)[0][0] <= max_width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines or [""]


def _ascii(text: str) -> str:
    """Hershey fonts draw ASCII only: "Hämorrhagie" becomes "Hamorrhagie" rather than "H?morrhagie"."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _secondary_capture(
    source: Dataset,
    pixels: np.ndarray,
    derivation: str,
    *,
    context: OutputContext,
    series_uid: str,
    instance_number: int,
    charset: str | MultiValue | None,
) -> Dataset:
    model = context.model
    orientation = patient_orientation(source)
    side = laterality(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=context.series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=model.manufacturer,
        patient_orientation=orientation or ("L", "F"),  # highdicom wants a value; emptied below if unknown
        laterality=side,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[contributing_equipment(model)],
        series_description=context.series_description,
        manufacturer_model_name=model.name,
        software_versions=model.software_version,
        specific_character_set=charset,
    )
    if orientation is None:
        sc.PatientOrientation = []  # Type 2: unknown
    # General Series: Laterality is Type 2C, needed unless the body part is known to be unpaired.
    # Carrying the source's Body Part Examined over settles that; with neither, say "unknown".
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    elif side is None:
        sc.Laterality = ""
    sc.DeviceUID = model.device_uid  # General Equipment: the AI device made this instance
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = derivation
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    sc.SourceImageSequence = [reference]
    return sc
