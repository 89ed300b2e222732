"""Synthetic DICOM instances for the demo tasks: the attributes every instance shares
(:func:`base_dataset`, which the head-CT series builds on too), radiographs and colour photographs.

A phantom module renders pixels with known ground truth; these builders wrap them in a complete
instance of the matching IOD (checked with dciodvfy) as a modality would send it — SOP class,
Modality, anatomic region and laterality included, since routes choose a task by them — so demo
studies and tests travel the real DICOM path. UIDs derive from ``key``: the same key gives the same
instance.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DermoscopicPhotographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    OphthalmicPhotography8BitImageStorage,
    VLPhotographicImageStorage,
    generate_uid,
)

from node.ingest.photo import Code, code, set_colour_pixels

WHEN = datetime(2024, 1, 1, 9, 0, 0)


def uid(key: str, part: str) -> str:
    """The UID of ``part`` (study, series, sop1 …) of the synthetic instance or series named ``key``."""
    return str(generate_uid(entropy_srcs=["ainode-demo", key, part]))


def _ophthalmic(ds: Dataset) -> None:
    """The Ophthalmic Photography 8 Bit modules beyond a VL photograph, as a non-mydriatic fundus
    camera fills them: one frame, no stereo synchronisation, a 45° field, the camera's type."""
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = "0"
    ds.SynchronizationFrameOfReferenceUID = "1.2.840.10008.15.1.1"  # UTC
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "N"
    ds.PatientEyeMovementCommanded = "NO"
    ds.HorizontalFieldOfView = 45.0
    ds.RefractiveStateSequence = []
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.PupilDilated = "NO"
    ds.AcquisitionDeviceTypeCodeSequence = [code("409898007", "SCT", "Fundus Camera")]
    ds.IlluminationTypeCodeSequence = []
    ds.LightPathFilterTypeStackCodeSequence = []
    ds.ImagePathFilterTypeStackCodeSequence = []
    ds.LensesCodeSequence = []
    ds.DetectorType = "CMOS"


def _dermoscopic(ds: Dataset) -> None:
    """The Dermoscopic Photography modules beyond a VL photograph, as a polarised contact-free
    dermatoscope on a phone fills them."""
    ds.FrameOfReferenceUID = uid(str(ds.SeriesInstanceUID), "frame")  # one per series
    ds.PositionReferenceIndicator = ""
    ds.DeviceSerialNumber = "PHANTOM-0001"
    ds.SoftwareVersions = "1"
    ds.RecognizableVisualFeatures = "NO"
    ds.LightSourcePolarization = "POLARIZED"
    ds.EmitterColorTemperature = None
    ds.ContactMethod = "NON_CONTACT"
    ds.OpticalMagnificationFactor = 10.0


# Per photographic SOP class: its Modality, and the modules its IOD adds to a VL photograph.
_PHOTOGRAPHIC = {
    VLPhotographicImageStorage: ("XC", None),
    OphthalmicPhotography8BitImageStorage: ("OP", _ophthalmic),
    DermoscopicPhotographyImageStorage: ("DMS", _dermoscopic),
}


def base_dataset(
    key: str, sop_class_uid: UID, modality: str, *, study: str, series: str, body_part: str, instance: int = 1
) -> Dataset:
    """Patient, study, series, equipment and SOP attributes of instance ``instance`` of the synthetic
    series named by ``key``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = uid(key, f"sop{instance}")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = "PHANTOM^DEMO"
    ds.PatientID = "PH" + uid(key, "patient")[-10:]
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uid(key, "study")
    ds.SeriesInstanceUID = uid(key, "series")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = WHEN.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = WHEN.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "PH" + uid(key, "accession")[-12:]
    ds.StudyDescription = study
    ds.SeriesDescription = f"{series} (synthetic phantom)"
    ds.Modality = modality
    if body_part:  # Type 3; a dermoscope, for one, names the site in the Anatomic Region Sequence only
        ds.BodyPartExamined = body_part
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.Manufacturer = "AI node project"
    ds.ManufacturerModelName = "Synthetic phantom"
    ds.InstitutionName = "Synthetic"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    return ds


def radiograph(
    pixels: np.ndarray,
    key: str,
    *,
    study: str,
    series: str,
    body_part: str,
    view_position: str = "PA",
    pixel_spacing_mm: float = 0.2,
    monochrome1: bool = False,
) -> Dataset:
    """A DX For Presentation instance from (H, W) attenuation-like values in [0, 1] (1 = bone-white as
    displayed), stored in 12 bits, MONOCHROME2 or (inverted) MONOCHROME1 as some detectors send."""
    if pixels.ndim != 2:
        raise ValueError(f"a radiograph is (H, W), got {pixels.shape}")
    ds = base_dataset(
        key, DigitalXRayImageStorageForPresentation, "DX", study=study, series=series, body_part=body_part
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ViewPosition = view_position
    ds.PatientOrientation = ["L", "F"]  # frontal films hang with the patient's right on the viewer's left
    ds.ImagerPixelSpacing = ds.PixelSpacing = [f"{pixel_spacing_mm:.4f}", f"{pixel_spacing_mm:.4f}"]
    ds.BurnedInAnnotation = "NO"
    ds.DetectorType = "SCINTILLATOR"
    ds.AcquisitionDate = ds.ContentDate
    ds.AcquisitionTime = ds.ContentTime
    ds.KVP = "100"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if monochrome1 else 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.ImageLaterality = "U"  # a chest is unpaired
    ds.PositionerType = ""
    ds.AcquisitionContextSequence = []
    ds.AnatomicRegionSequence = (
        [code("51185008", "SCT", "Thoracic structure")] if body_part == "CHEST" else []
    )
    if view_position == "PA":
        ds.ViewCodeSequence = [code("399348003", "SCT", "postero-anterior")]
    values = np.clip(pixels, 0.0, 1.0)
    stored = np.rint((1.0 - values if monochrome1 else values) * 4095).astype("<u2")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    ds.PixelData = stored.tobytes()
    return ds


def photograph(
    rgb: np.ndarray,
    key: str,
    *,
    study: str,
    series: str,
    body_part: str,
    laterality: str | None = None,
    region: Code | None = None,
    sop_class_uid: UID = VLPhotographicImageStorage,
    modality: str | None = None,
) -> Dataset:
    """A VL Photographic, Ophthalmic Photography 8 Bit or Dermoscopic Photography image (by
    ``sop_class_uid``) from (H, W, 3) uint8 RGB: what is photographed in the Anatomic Region Sequence
    (``region``), Image Laterality R, L, U (unpaired) or B, Modality the class's unless given."""
    if sop_class_uid not in _PHOTOGRAPHIC:
        raise ValueError(f"SOP class {sop_class_uid} is not one of {sorted(_PHOTOGRAPHIC)}")
    own_modality, modules = _PHOTOGRAPHIC[sop_class_uid]
    ds = base_dataset(
        key, sop_class_uid, modality or own_modality, study=study, series=series, body_part=body_part
    )
    if laterality is not None:
        if laterality not in ("L", "R", "U", "B"):
            raise ValueError(f"laterality is 'L', 'R', 'U' or 'B', got {laterality!r}")
        ds.ImageLaterality = laterality
    if region is not None:
        ds.AnatomicRegionSequence = [code(*region)]
    if modules is not None:
        modules(ds)
    ds.AcquisitionContextSequence = []
    ds.LossyImageCompression = "00"
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.AcquisitionDateTime = WHEN.strftime("%Y%m%d%H%M%S")
    set_colour_pixels(ds, rgb)
    return ds
