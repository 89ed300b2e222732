"""The ``sr`` output, the machine-readable result: a Comprehensive 3D SR with the TID 1500 Measurement
Report root, the shape OHIF displays and IHE AI Results (AIR) asks for.

One TID 1501 measurement group per finding: tracking identifier and tracking UID (OHIF needs both),
the finding, the algorithm (TID 4019), the verdict as a qualitative evaluation (Present/Absent), the
probability as a measurement, the source images, and the disclaimer as a free-text evaluation (TID
1501 allows TEXT evaluations; highdicom only builds coded ones, so it is appended as its maintainers
suggest). A series that was not analysed gets one group that says so and why, with no probability.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from handlers.base import Analysis, Finding
from node.outputs.common import character_set, contributing_equipment, disclaimer_lines, not_analysed_text
from node.outputs.registry import OutputContext, register_output
from node.runtime.identity import ModelIdentity

_PROBABILITY = codes.DCM.Probability  # DCM 122157
_NO_UNITS = codes.UCUM.NoUnits  # UCUM "1": a probability is a dimensionless fraction in [0, 1]
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


@register_output("sr", kind="SR", series_number=9001, series_description="AI report: {task}")
def structured_report(context: OutputContext) -> list[Dataset]:
    """The SR for one analysed (or rejected) series. What the outputs before it made is its evidence,
    and the images among them (the overlays) go into its image library, so a viewer can find them."""
    analysis, model, evidence = context.analysis, context.model, context.earlier
    images = [ds for ds in evidence if "PixelData" in ds]
    sources = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in analysis.sources]
    if analysis.analysed:
        groups = [_finding_group(finding, model, sources) for finding in analysis.findings]
    else:
        groups = [_not_analysed_group(analysis, model, sources)]
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
        specific_character_set=character_set(context),
    )
    sr.DeviceUID = model.device_uid  # General Equipment: the AI device made this instance
    return [sr]


def _finding_group(
    finding: Finding, model: ModelIdentity, sources: list[hd.sr.SourceImageForMeasurementGroup]
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    concept = hd.sr.CodedConcept.from_code(finding.concept)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=finding.concept.meaning),
        finding_type=concept,
        algorithm_id=_algorithm(model, [f"threshold={finding.threshold:g}"]),
        measurements=[hd.sr.Measurement(name=_PROBABILITY, value=finding.probability, unit=_NO_UNITS)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=concept, value=_PRESENT if finding.present else _ABSENT)
        ],
        source_images=sources,
    )
    return group


def _not_analysed_group(
    analysis: Analysis, model: ModelIdentity, sources: list[hd.sr.SourceImageForMeasurementGroup]
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """Coded as the CAD summary "No algorithms succeeded; without findings" (TID 4001, CID 6047),
    with the reason in words."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=analysis.task),
        algorithm_id=_algorithm(model),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=codes.DCM.CADProcessingAndFindingsSummary,
                value=codes.DCM.NoAlgorithmsSucceededWithoutFindings,
            )
        ],
        source_images=sources,
    )
    _add_comment(group, not_analysed_text(analysis.not_analysed_reason or ""))
    return group


def _algorithm(model: ModelIdentity, parameters: Sequence[str] = ()) -> hd.sr.AlgorithmIdentification:
    """TID 4019; the weights' sha256 pins the exact model that produced the result."""
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"sha256={model.sha256}", *parameters],
        family=codes.DCM.ArtificialIntelligence,
        manufacturer=model.manufacturer,
    )


def _add_comment(group: hd.sr.MeasurementsAndQualitativeEvaluations, text: str) -> None:
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
