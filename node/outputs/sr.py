"""The ``sr`` output, the machine-readable result: a Comprehensive 3D SR with the TID 1500 Measurement
Report root, the shape OHIF displays and IHE AI Results (AIR) asks for.

One TID 1410 planar-ROI measurement group per finding: tracking identifier and tracking UID (OHIF needs
both), an image region (SCOORD) on the source image that drives the finding, the finding, its finding
site, the algorithm (TID 4019), the verdict as a qualitative evaluation (Present/Absent), the
probability as a measurement, and the disclaimer as a free-text evaluation (TID 1501 allows TEXT
evaluations; highdicom only builds coded ones, so it is appended as its maintainers suggest).

Every group carries a region, because OHIF draws only groups that do, and (3.13) fails to load a report
with a group that has none. The region says what it is, in the group's comment: for a finding present
and located, the outline of its hot Grad-CAM area; otherwise the area of the image that was analysed
(no focal location is claimed). A series that was not analysed gets one group on its middle image
that says so and why, with no probability. A segmentation (mask) gets a group with its outline and
area: mm² where the source gives its pixel spacing, else pixels, never a guessed unit.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from handlers.base import Analysis, Finding, Mask, outline
from node.outputs.common import (
    contributing_equipment,
    disclaimer_lines,
    middle_image,
    not_analysed_text,
)
from node.outputs.registry import OutputContext, register_output
from node.runtime.identity import ModelIdentity

_PROBABILITY = codes.DCM.Probability  # DCM 122157
_NO_UNITS = codes.UCUM.NoUnits  # UCUM "1": a probability is a dimensionless fraction in [0, 1]
_SQUARE_MM = codes.UCUM.SquareMillimeter
_PIXELS = Code("{pixels}", "UCUM", "Pixels")  # a count of pixels: UCUM's unity, annotated
_PRESENT = codes.cid241.Present  # SCT 52101004, CID 241 "Present-Absent Only"
_ABSENT = codes.cid241.Absent  # SCT 272519000, the code CID 241 gives "Absent" (not 2667000)
_CT_HEAD = Code("303653007", "SCT", "Computed tomography of head")
_PROCEDURE_BY_MODALITY = {  # CID 100 "Quantitative Diagnostic Imaging Procedures"
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "CR": codes.cid100.XRUnspecifiedBodyRegion,
    "DX": codes.cid100.XRUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
}
HOT_AREA = "Region: the area of strongest Grad-CAM evidence (at least half its peak)"
ANALYSED_AREA = "Region: the image area analysed; no focal location"
PEAK = "Region: the Grad-CAM peak"


@register_output("sr", kind="SR", series_number=9001, series_description="AI report: {task}")
def structured_report(context: OutputContext) -> list[Dataset]:
    """The SR for one analysed (or rejected) series. What the outputs before it made is its evidence,
    and the images among them (the overlays) go into its image library, so a viewer can find them."""
    analysis, model, evidence = context.analysis, context.model, context.earlier
    images = [ds for ds in evidence if "PixelData" in ds]
    groups: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]
    if analysis.analysed:
        groups = [_finding_group(finding, analysis, model) for finding in analysis.findings]
        groups += [_mask_group(mask) for mask in analysis.masks]
    else:
        groups = [_not_analysed_group(analysis, model)]
    for group in groups:
        _add_comment(group, ". ".join(disclaimer_lines(model)))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=model.device_uid, name=model.name, manufacturer_name=model.manufacturer, model_name=model.name
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device
            )
        ),
        procedure_reported=_procedure(analysis.sources[0]),
        imaging_measurements=groups,
        referenced_images=images or None,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*analysis.sources, *evidence],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=context.series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=model.manufacturer,
        is_complete=True,
        series_description=context.series_description,
        manufacturer_model_name=model.name,
        software_versions=model.software_version,
        contributing_equipment=[contributing_equipment(model)],
        specific_character_set=None,  # not the source's: node.outputs.charset sets that, as it is
    )
    sr.DeviceUID = model.device_uid  # General Equipment: the AI device made this instance
    return [sr]


def _finding_group(
    finding: Finding, analysis: Analysis, model: ModelIdentity
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    concept = hd.sr.CodedConcept.from_code(finding.concept)
    region, note = _finding_region(finding, analysis)
    name = (
        finding.concept.meaning
        if finding.site is None
        else f"{finding.concept.meaning}, {finding.site.words}"
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=name),
        referenced_region=region,
        finding_type=concept,
        algorithm_id=_algorithm(model, [f"threshold={finding.threshold:g}"]),
        finding_sites=None if finding.site is None else [_finding_site(finding)],
        measurements=[hd.sr.Measurement(name=_PROBABILITY, value=finding.probability, unit=_NO_UNITS)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=concept, value=_PRESENT if finding.present else _ABSENT)
        ],
    )
    for text in (note, finding.note):
        if text:
            _add_comment(group, text)
    return group


def _finding_site(finding: Finding) -> hd.sr.FindingSite:
    site = finding.site
    assert site is not None
    return hd.sr.FindingSite(
        anatomic_location=site.structure, laterality=site.laterality, topographical_modifier=site.modifier
    )


def _finding_region(finding: Finding, analysis: Analysis) -> tuple[hd.sr.ImageRegion, str]:
    """Where the group is drawn, and what that region is. A finding present and located: the hot
    area's outline (or its peak, when the area is too small to outline) on the image explaining it.
    Otherwise the area analysed on the image that drives the finding."""
    explanation = next((e for e in analysis.explanations if e.finding is finding), None)
    if explanation is not None:
        place = explanation.location
        if finding.present and place is not None:
            if len(place.outline) >= 3:
                return _polyline(explanation.source, place.outline), HOT_AREA
            return _region(explanation.source, "POINT", [[place.column + 0.5, place.row + 0.5]]), PEAK
        top, left, height, width = explanation.source_region
        return _rectangle(explanation.source, top, left, height, width), ANALYSED_AREA
    image = finding.image if finding.image is not None else middle_image(analysis.sources)
    return _rectangle(image, 0, 0, int(image.Rows), int(image.Columns)), ANALYSED_AREA


def _mask_group(mask: Mask) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """A segmented region: its outline, and its area in mm² where the source's pixel spacing is
    known, else in pixels."""
    pixels = int(mask.pixels.sum())
    spacing = mask.source.get("PixelSpacing")
    if spacing and len(spacing) == 2:
        area, unit = pixels * float(spacing[0]) * float(spacing[1]), _SQUARE_MM
    else:
        area, unit = float(pixels), _PIXELS
    border = outline(mask.pixels)
    region = (
        _polyline(mask.source, border)
        if len(border) >= 3
        else _rectangle(mask.source, 0, 0, int(mask.source.Rows), int(mask.source.Columns))
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"{mask.label} outline"),
        referenced_region=region,
        finding_type=hd.sr.CodedConcept.from_code(mask.concept),
        algorithm_id=None if mask.model is None else _algorithm(mask.model),  # the segmentation model
        measurements=[hd.sr.Measurement(name=codes.SCT.Area, value=area, unit=unit)],
    )
    _add_comment(
        group,
        f"Region: the segmentation's outline of the {mask.label.lower()} (its largest part, through the "
        "centres of its edge pixels); the area counts every segmented pixel"
        if len(border) >= 3
        else f"No {mask.label.lower()} segmented; region: the whole image",
    )
    return group


def _not_analysed_group(
    analysis: Analysis, model: ModelIdentity
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """Coded as the CAD summary "No algorithms succeeded; without findings" (TID 4001, CID 6047),
    with the reason in words, on the middle image, where a viewer shows it."""
    image = middle_image(analysis.sources)
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=analysis.task),
        referenced_region=_rectangle(image, 0, 0, int(image.Rows), int(image.Columns)),
        algorithm_id=_algorithm(model),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=codes.DCM.CADProcessingAndFindingsSummary,
                value=codes.DCM.NoAlgorithmsSucceededWithoutFindings,
            )
        ],
    )
    _add_comment(group, not_analysed_text(analysis.not_analysed_reason or ""))
    return group


def _region(source: Dataset, graphic_type: str, points: Sequence[Sequence[float]]) -> hd.sr.ImageRegion:
    """An image region in DICOM's image coordinates (column, row; the top left corner of the top left
    pixel is 0, 0) selected from ``source``."""
    return hd.sr.ImageRegion(
        graphic_type=graphic_type,
        graphic_data=np.asarray(points, np.float64),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=source.SOPClassUID, referenced_sop_instance_uid=source.SOPInstanceUID
        ),
    )


def _polyline(source: Dataset, vertices: np.ndarray) -> hd.sr.ImageRegion:
    """A closed polygon through pixel positions (column, row) — pixel indices, whose centres lie at
    +0.5 in DICOM's image coordinates."""
    points = np.asarray(vertices, np.float64) + 0.5
    return _region(source, "POLYLINE", [*points.tolist(), points[0].tolist()])


def _rectangle(source: Dataset, top: int, left: int, height: int, width: int) -> hd.sr.ImageRegion:
    corners = [[left, top], [left + width, top], [left + width, top + height], [left, top + height]]
    return _region(source, "POLYLINE", [*corners, corners[0]])


def _algorithm(model: ModelIdentity, parameters: Sequence[str] = ()) -> hd.sr.AlgorithmIdentification:
    """TID 4019; the weights' sha256 pins the exact model that produced the result."""
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"sha256={model.sha256}", *parameters],
        family=codes.DCM.ArtificialIntelligence,
        manufacturer=model.manufacturer,
    )


def _add_comment(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations, text: str) -> None:
    """A TEXT qualitative evaluation (TID 1501 row 12) named DCM 121106 "Comment"."""
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
    )


def _procedure(source: Dataset) -> Code:
    """The imaging procedure the findings are about (IHE AIR: not the algorithm), as precise as
    the source's Modality and Body Part Examined allow."""
    modality = source.get("Modality", "")
    if modality == "CT" and source.get("BodyPartExamined", "").upper() in ("HEAD", "BRAIN"):
        return _CT_HEAD
    return _PROCEDURE_BY_MODALITY.get(modality, codes.cid100.ImagingProcedure)
