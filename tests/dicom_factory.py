"""Small, valid source images built in memory, so the results writers can be tested without files.

Each builder returns a complete instance of its IOD (checked with dciodvfy) in Explicit VR Little
Endian, with the pixel data encoded, as it would arrive from a modality.
"""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    VLPhotographicImageStorage,
    generate_uid,
)


def _base(sop_class_uid: UID, modality: str, study_uid: str | None, series_uid: str | None) -> Dataset:
    """Patient, study, series, equipment and SOP common attributes every source shares."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "PH0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate = "20240601"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = 1
    ds.Manufacturer = "Phantom Imaging"
    ds.ManufacturerModelName = "Synthetic"
    ds.SoftwareVersions = "1.0"
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.InstanceNumber = 1
    return ds


def _monochrome_pixels(ds: Dataset, pixels: np.ndarray, bits_stored: int, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()


def _head_phantom(size: int, z: float) -> np.ndarray:
    """HU-ish axial head slice: air, a skull ring, brain, ventricles and a small bright blob."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot((xx - size / 2) / (0.36 * size), (yy - size / 2) / (0.44 * size))
    img = np.full((size, size), -1000.0)
    img[r < 1.0] = 1000.0  # bone
    img[r < 0.92] = 35.0  # brain
    vent = np.hypot((xx - size / 2) / (0.05 * size), (yy - size / 2) / (0.12 * size)) < 1
    img[vent] = 8.0
    blob = np.hypot(xx - 0.62 * size, yy - 0.4 * size) < 0.04 * size * (1 + 0.1 * z)
    img[blob] = 70.0  # hyperdense, hemorrhage-like
    return img + np.random.default_rng(int(z)).normal(0, 4, img.shape)


def ct_slice(
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance_number: int = 1,
    size: int = 512,
    windowed: bool = True,
) -> Dataset:
    """One axial CT Image Storage slice of a head phantom, stored as int16 with rescale -1024."""
    ds = _base(CTImageStorage, "CT", study_uid, series_uid)
    ds.SeriesDescription = "Head phantom"
    ds.BodyPartExamined = "HEAD"
    ds.InstanceNumber = instance_number
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[ds.SeriesInstanceUID])
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.KVP = 120
    ds.SliceThickness = 5.0
    ds.PixelSpacing = [0.45, 0.45]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    z = 5.0 * (instance_number - 1)
    ds.ImagePositionPatient = [-115.2, -115.2, z]
    ds.SliceLocation = z
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    if windowed:
        ds.WindowCenter = 40
        ds.WindowWidth = 80
    stored = np.clip(_head_phantom(size, z) + 1024, -2000, 4095)
    _monochrome_pixels(ds, stored, bits_stored=16, signed=True)
    return ds


def ct_series(n: int = 3, size: int = 512) -> list[Dataset]:
    """``n`` contiguous slices of one series."""
    study_uid, series_uid = generate_uid(), generate_uid()
    return [ct_slice(study_uid, series_uid, i + 1, size) for i in range(n)]


def cr_chest(rows: int = 600, columns: int = 500) -> Dataset:
    """A Computed Radiography PA chest, MONOCHROME1 (bright = low attenuation), 12 bits stored."""
    ds = _base(ComputedRadiographyImageStorage, "CR", None, None)
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PhotometricInterpretation = "MONOCHROME1"
    yy, xx = np.mgrid[:rows, :columns]
    lungs = (np.hypot((xx - 0.3 * columns) / (0.15 * columns), (yy - 0.45 * rows) / (0.3 * rows)) < 1) | (
        np.hypot((xx - 0.7 * columns) / (0.15 * columns), (yy - 0.45 * rows) / (0.3 * rows)) < 1
    )
    pixels = np.where(lungs, 3500, 1200) + np.random.default_rng(1).normal(0, 30, (rows, columns))
    _monochrome_pixels(ds, np.clip(pixels, 0, 4095), bits_stored=12, signed=False)
    return ds


def photo(rows: int = 384, columns: int = 512) -> Dataset:
    """A VL Photographic Image (external camera, XC) of a right eye, RGB 8-bit, fundus-like."""
    ds = _base(VLPhotographicImageStorage, "XC", None, None)
    ds.BodyPartExamined = "EYE"
    ds.Laterality = "R"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.AcquisitionContextSequence = []
    ds.LossyImageCompression = "00"
    ds.PatientOrientation = ""
    yy, xx = np.mgrid[:rows, :columns]
    disc = np.hypot(xx - columns / 2, yy - rows / 2) < 0.4 * rows
    rgb = np.zeros((rows, columns, 3), np.uint8)
    rgb[...] = (200, 150, 120)
    rgb[disc] = (120, 60, 40)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rgb.tobytes()
    return ds
