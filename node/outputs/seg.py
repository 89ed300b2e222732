"""The ``seg`` output: the masks a segmentation model drew, as binary DICOM Segmentations that viewers
lay over the source image (OHIF, Weasis, 3D Slicer) and programs read back pixel for pixel.

One SEG per source image that has masks, one segment per mask, all in one new series. Each segment
is AUTOMATIC, names the model that drew it (algorithm name, version, family, weights' sha256) and
what it outlines (category Morphologically Abnormal Structure, type the mask's own code), and says
that it is not for diagnostic use.

Photographs have no plane geometry: no Image Orientation (Patient), and often no Frame of Reference
(a VL Photographic Image has none; a Dermoscopic Photography Image has one but nothing placed in
it). For them the Segmentation IOD (PS3.3 A.51.5.1) asks that "each pixel of the segmentation
shall correspond to a pixel in a referenced image, using the Derivation Image Functional Group",
which highdicom writes, and highdicom writes no plane geometry. OHIF 3.13 cannot load such a SEG:
its adapters read every frame's Image Orientation (Patient) and throw without one. The standard
allows the geometry only within a Frame of Reference: Plane Orientation (Patient) "May be present
otherwise if the Frame of Reference is defined in the patient-relative Reference Coordinate
System" (Table A.51-2), and "When a Frame of Reference UID is present the segment shall be
specified within that coordinate system, using the Pixel Measures and either the Plane Position
(Patient) and Plane Orientation (Patient) ... Functional Groups" (A.51.5.1). The Frame of Reference
module is "Required if Derivation Image Functional Group is not present. May be present otherwise"
(Table A.51-1), and a SEG has its source's Frame of Reference where the source has one (A.51). So
the SEG of an image without plane geometry keeps its source's Frame of Reference, or gets one of its
own (shared with nothing) where the source has none, and in it Pixel Measures, Plane Position
(Patient) and Plane Orientation (Patient) with nominal values: identity orientation and origin 0
(what OHIF assumes for an image without any), the source's pixel spacing or 1 mm. They place nothing
in the patient, and the SEG says so in Derivation Description; every frame still references its
source pixel for pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from handlers.base import Mask
from node.outputs.common import contributing_equipment, disclaimer_lines
from node.outputs.registry import OutputContext, register_output
from node.runtime.identity import DEFAULT_DISCLAIMER, ModelIdentity

_CATEGORY = codes.cid7150.MorphologicallyAbnormalStructure  # SCT 49755003, CID 7150
_CONTENT_LABEL = "AI_SEGMENTATION"  # CS, at most 16 characters
_NOMINAL = (
    "The source image has no plane geometry: each frame corresponds to its source image pixel for "
    "pixel (Derivation Image), and this segmentation's plane position, orientation and pixel measures "
    "are nominal; they place nothing in the patient."
)


@register_output("seg", kind="SEG", series_number=9002, series_description="AI segmentation: {task}")
def segmentations(context: OutputContext) -> list[Dataset]:
    """A SEG for each source image with masks; none for a series without masks (not analysed, or
    analysed without a segmentation model)."""
    by_source: dict[str, list[Mask]] = {}
    for mask in context.analysis.masks:
        by_source.setdefault(str(mask.source.SOPInstanceUID), []).append(mask)
    series_uid = generate_uid()
    return [
        _segmentation(masks, context, series_uid, number)
        for number, masks in enumerate(by_source.values(), start=1)
    ]


def _segmentation(masks: Sequence[Mask], context: OutputContext, series_uid: str, number: int) -> Dataset:
    source = masks[0].source
    models = list(dict.fromkeys(mask.model or context.model for mask in masks))
    maker = models[0]
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=np.stack([mask.pixels for mask in masks], axis=-1)[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            _segment(index, mask, mask.model or context.model) for index, mask in enumerate(masks, start=1)
        ],
        series_instance_uid=series_uid,
        series_number=context.series_number,
        sop_instance_uid=generate_uid(),
        instance_number=number,
        manufacturer=maker.manufacturer,
        manufacturer_model_name=maker.name,
        software_versions=maker.software_version,
        device_serial_number=maker.device_uid,  # the one identifier this software device has
        content_description=f"{DEFAULT_DISCLAIMER}: AI segmentation",
        content_label=_CONTENT_LABEL,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,  # an empty mask is an answer too: the model found nothing to outline
        series_description=context.series_description,
        contributing_equipment=[contributing_equipment(model) for model in models],
        specific_character_set=None,  # not the source's: node.outputs.charset sets that, as it is
    )
    seg.DeviceUID = maker.device_uid  # General Equipment: the AI device made this instance
    seg.ImageComments = ". ".join(disclaimer_lines(maker))
    description = f"Segmented by {', '.join(f'{m.name} {m.version}' for m in models)}"
    if "PlaneOrientationSequence" not in seg.SharedFunctionalGroupsSequence[0]:
        _nominal_geometry(seg, source)
        description = f"{description}. {_NOMINAL}"
    seg.DerivationDescription = description
    return seg


def _segment(number: int, mask: Mask, model: ModelIdentity) -> hd.seg.SegmentDescription:
    segment = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=mask.label,
        segmented_property_category=_CATEGORY,
        segmented_property_type=mask.concept,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model.name,
            family=codes.cid7162.ArtificialIntelligence,
            version=model.version,
            parameters={"sha256": model.sha256},
        ),
    )
    segment.SegmentDescription = ". ".join(disclaimer_lines(model))  # Type 3, ST: the disclaimer
    return segment


def _nominal_geometry(seg: Dataset, source: Dataset) -> None:
    """The plane geometry A.51.5.1 asks for in the SEG's Frame of Reference (the source's, else one
    of its own): the orientation and position OHIF assumes for an image without any, the source's
    pixel spacing where it states one, else 1 mm (and 1 mm thick)."""
    if "FrameOfReferenceUID" not in seg:
        seg.FrameOfReferenceUID = generate_uid()
        seg.PositionReferenceIndicator = ""  # Type 2: no anatomical reference point
    shared = seg.SharedFunctionalGroupsSequence[0]
    shared.PlaneOrientationSequence = hd.PlaneOrientationSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT, image_orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    )
    spacing = source.get("PixelSpacing") or (1.0, 1.0)
    shared.PixelMeasuresSequence = hd.PixelMeasuresSequence(
        pixel_spacing=[float(value) for value in spacing], slice_thickness=1.0
    )
    for frame in seg.PerFrameFunctionalGroupsSequence:
        frame.PlanePositionSequence = hd.PlanePositionSequence(
            coordinate_system=hd.CoordinateSystemNames.PATIENT, image_position=(0.0, 0.0, 0.0)
        )
