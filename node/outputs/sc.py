"""The ``sc`` output: Secondary Capture overlays, the one result every PACS viewer displays.

Each image is the Grad-CAM heatmap blended over what the model saw, with a caption band added
below it (never over the anatomy) that says what was found, by which model, and that the result
is not for diagnostic use. The caption is burned in, so it survives any viewer.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from handlers.base import Explanation, Mask
from node.dicom.attributes import laterality, patient_orientation
from node.dicom.display import display_rgb8
from node.outputs.charset import transliterate
from node.outputs.common import (
    contributing_equipment,
    disclaimer_lines,
    middle_image,
    not_analysed_text,
)
from node.outputs.registry import OutputContext, register_output
from node.runtime.identity import ModelIdentity

_MIN_WIDTH = 512  # narrower images are enlarged so that the caption stays legible
_HEAT_ALPHA = 0.5  # opacity of the heatmap where it is 1; it fades out with the heat
_FONT = cv2.FONT_HERSHEY_SIMPLEX
Colour = tuple[int, int, int]
_WHITE: Colour = (255, 255, 255)
_YELLOW: Colour = (255, 220, 0)
_GREY: Colour = (128, 128, 128)
_GREEN: Colour = (0, 255, 0)  # a segmentation's outline: a colour the JET heatmap never takes
Line = tuple[str, Colour]


@register_output("sc", kind="SC", series_number=9000, series_description="AI overlay: {task}")
def secondary_captures(context: OutputContext) -> list[Dataset]:
    """One SC per explanation, in a new series of the source study; one series per side where the
    pages show both (the two eyes of a visit), since Laterality belongs to the series. A series that was
    not analysed gets one SC of its middle image saying why, so the reader is never left guessing."""
    analysis, model = context.analysis, context.model
    if analysis.analysed:
        pages = [_explained(explanation, analysis.masks, model) for explanation in analysis.explanations]
    else:
        source = middle_image(analysis.sources)
        reason = (not_analysed_text(analysis.not_analysed_reason or ""), _YELLOW)
        pages = [
            (source, display_rgb8(source), [reason], "Middle source image, not analysed; caption burned in")
        ]
    series: dict[str | None, tuple[str, list[Dataset]]] = {}
    for source, image, verdict, derivation in pages:
        series_uid, written = series.setdefault(laterality(source), (generate_uid(), []))
        written.append(
            _secondary_capture(
                source,
                _with_caption(image, _caption(analysis.task, verdict, model)),
                derivation,
                context=context,
                series_uid=series_uid,
                instance_number=len(written) + 1,
            )
        )
    return [sc for _, written in series.values() for sc in written]


def _explained(
    explanation: Explanation, masks: Sequence[Mask], model: ModelIdentity
) -> tuple[Dataset, np.ndarray, list[Line], str]:
    """The page of one explanation: the heatmap, and the outline of every mask of the same source
    image, each named in the caption with the model that drew it."""
    uid = explanation.source.SOPInstanceUID
    outlined = [mask for mask in masks if mask.source.SOPInstanceUID == uid]
    verdict = [(_finding_text(explanation), _WHITE)]
    for mask in outlined:
        drawer = mask.model or model
        verdict.append((f"Outline: {mask.label} (segmentation model {drawer.name} {drawer.version})", _GREEN))
    drawn = "".join(f"; outline of {mask.label} from its segmentation" for mask in outlined)
    derivation = f"Grad-CAM heatmap of {explanation.label} over the model input{drawn}; caption burned in"
    return explanation.source, _overlay(explanation, outlined), verdict, derivation


def _caption(task: str, verdict: Sequence[Line], model: ModelIdentity) -> list[Line]:
    return [
        (task, _WHITE),
        *verdict,
        (f"Model: {model.name} {model.version}", _WHITE),
        *[(line, _YELLOW) for line in disclaimer_lines(model)],
    ]


def _finding_text(explanation: Explanation) -> str:
    """The verdict on the finding this image explains, and the probability on this image."""
    finding = explanation.finding
    if finding is None:
        return f"{explanation.label}: probability {explanation.probability:.2f} on this image"
    verdict = "PRESENT" if finding.present else "ABSENT"
    where = f" ({finding.site.words})" if finding.site else ""
    return (
        f"{finding.concept.meaning}{where}: {verdict}, probability {finding.probability:.2f} "
        f"(this image {explanation.probability:.2f})"
    )


def _overlay(explanation: Explanation, masks: Sequence[Mask]) -> np.ndarray:
    """JET heatmap over the image, opaque where the heat is high and clear where it is low, so that
    the anatomy around a hot spot stays readable; each mask's outline over it in green."""
    heat = np.clip(explanation.heatmap.astype(np.float32), 0.0, 1.0)
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    alpha = (_HEAT_ALPHA * heat)[..., None]
    blended = explanation.image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha
    image = np.round(blended).astype(np.uint8)
    for mask in masks:
        _draw_outline(image, explanation, mask.pixels)
    return image


def _draw_outline(image: np.ndarray, explanation: Explanation, pixels: np.ndarray) -> None:
    """The mask's borders (holes' too), traced on the source's pixels and drawn where ``image`` shows
    them (the explanation's region, scaled), 2 px wide once the page is 512 px wide."""
    contours, _ = cv2.findContours(pixels.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    top, left, height, width = explanation.source_region
    scale = np.array([image.shape[1] / width, image.shape[0] / height])
    shift = 4  # cv2's fixed point: vertices to 1/16 pixel
    lines = [
        np.round(((c.reshape(-1, 2) - (left, top) + 0.5) * scale - 0.5) * (1 << shift)).astype(np.int32)
        for c in contours
    ]
    thickness = max(1, round(2 * image.shape[1] / _MIN_WIDTH))
    cv2.polylines(image, lines, isClosed=True, color=_GREEN, thickness=thickness, shift=shift)


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
        for part in _wrap(transliterate(text), width - 2 * margin, scale, thickness)
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


def _secondary_capture(
    source: Dataset,
    pixels: np.ndarray,
    derivation: str,
    *,
    context: OutputContext,
    series_uid: str,
    instance_number: int,
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
        specific_character_set=None,  # not the source's: node.outputs.charset sets that, as it is
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
