"""Photographs wrapped as DICOM (node.ingest.photo) and the details typed for them
(node.ingest.identity): valid objects by dciodvfy, the picture upright, nothing of EXIF but the pixels
and the time taken, and identities refused where DICOM cannot hold them or they cannot be right."""

from __future__ import annotations

import io
import struct
import zlib
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from node.ingest.identity import Details, InvalidDetails, check_details
from node.ingest.photo import KINDS, NotAPhoto, photograph_dataset, read_picture
from tests.peers import dciodvfy_errors

TODAY = date(2026, 11, 30)
NOW = datetime(2026, 11, 30, 14, 5, 6)
SECRETS = ("SecretMaker", "SecretPhone", "WGS-84-SECRET")  # EXIF device and place strings
FORM = {
    "patient_name": "Doe^Jane",
    "patient_id": "P-123",
    "patient_birth_date": "1980-02-29",
    "patient_sex": "f",
    "accession_number": "ACC1",
    "laterality": "l",
}


def jpeg_with_exif(orientation: int = 6, taken: str | None = "2025:06:01 10:20:30") -> bytes:
    """A 40 wide, 20 high JPEG, red on the left and blue on the right, with an EXIF orientation, the
    device's make and model and a GPS position as a phone writes them."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F], exif[0x0110] = SECRETS[0], SECRETS[1]  # Make, Model
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0), 3: "W", 4: (0.0, 7.0, 0.0), 0x12: SECRETS[2]}
    if taken:
        exif[0x8769] = {0x9003: taken}  # DateTimeOriginal
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def wrap(data: bytes, task: str, details: Details, tmp_path: Path) -> tuple[Path, pydicom.Dataset]:
    picture = read_picture(io.BytesIO(data), 2**30)
    ds = photograph_dataset(
        picture,
        KINDS[task],
        details,
        study_uid="1.2.3.4",
        series_uid="1.2.3.4.5",
        instance=1,
        operator="oscar",
        station="AINODE",
        now=NOW,
        source_bytes=len(data),
    )
    path = tmp_path / f"{task}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, pydicom.dcmread(path)


def test_a_jpeg_becomes_an_upright_vl_photograph_without_its_exif(tmp_path: Path) -> None:
    path, ds = wrap(jpeg_with_exif(), "conjunctiva", check_details(FORM, TODAY), tmp_path)
    assert dciodvfy_errors(path) == []
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.4" and ds.Modality == "XC"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    region = ds.AnatomicRegionSequence[0]
    assert (region.CodeValue, region.CodingSchemeDesignator) == ("29445007", "SCT")
    # Orientation 6: the camera was turned a quarter clockwise; upright, the left is on top.
    assert (ds.Rows, ds.Columns) == (40, 20)
    pixels = ds.pixel_array
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60  # top: red
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60  # bottom: blue
    assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_10918_1"
    assert ds.AcquisitionDateTime == "20250601102030"  # EXIF DateTimeOriginal
    assert ds.StudyDate == "20261130" and ds.StudyTime == "140506"
    assert (ds.PatientSex, ds.PatientBirthDate, ds.ImageLaterality) == ("F", "19800229", "L")
    assert ds.OperatorsName == "oscar" and ds.Manufacturer == "AI node upload"
    stored = path.read_bytes()
    assert not any(secret.encode() in stored for secret in SECRETS)
    assert b"Exif" not in stored


def test_a_png_is_lossless_and_without_a_date_taken_is_dated_now(tmp_path: Path) -> None:
    out = io.BytesIO()
    Image.fromarray(np.full((30, 30, 4), 128, np.uint8), "RGBA").save(out, "PNG")  # alpha dropped
    path, ds = wrap(out.getvalue(), "skin", check_details(FORM, TODAY), tmp_path)
    assert dciodvfy_errors(path) == []
    assert ds.LossyImageCompression == "00" and "LossyImageCompressionMethod" not in ds
    assert ds.AnatomicRegionSequence[0].CodeValue == "39937001"
    assert ds.AcquisitionDateTime == "20261130140506"
    assert ds.SamplesPerPixel == 3 and ds.PhotometricInterpretation == "RGB"


@pytest.mark.parametrize(
    "name",
    ["山田^太郎", "Yamada^Tarou=山田^太郎=やまだ^たろう", "Παπαδόπουλος^Νίκος", "العربي^أحمد"],
)
def test_names_in_any_script_are_kept_as_typed(tmp_path: Path, name: str) -> None:
    path, ds = wrap(jpeg_with_exif(), "skin", check_details({**FORM, "patient_name": name}, TODAY), tmp_path)
    assert dciodvfy_errors(path) == []
    assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == name


def test_a_16_bit_grey_png_keeps_its_greys(tmp_path: Path) -> None:
    out = io.BytesIO()
    Image.fromarray(np.full((8, 8), 0x8000, np.uint16)).save(out, "PNG")
    _, ds = wrap(out.getvalue(), "skin", check_details(FORM, TODAY), tmp_path)
    assert ds.pixel_array[4, 4].tolist() == [128, 128, 128]


# Each EXIF orientation as the turn or flip that makes the stored picture upright (TIFF 6.0 / EXIF 2.3).
UPRIGHT = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_every_exif_orientation_is_turned_upright(orientation: int) -> None:
    stored = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(stored).save(out, "PNG", exif=exif.tobytes())  # lossless: every pixel can be compared
    upright = read_picture(io.BytesIO(out.getvalue()), 2**30).rgb
    assert np.array_equal(upright, UPRIGHT[orientation](stored))


def test_a_photo_with_a_damaged_exif_tag_is_still_turned_upright() -> None:
    """The device's Make written as a RATIONAL rather than text, as a faulty camera might: Pillow's
    exif_transpose fails writing that back; the node keeps no EXIF and needs only the orientation."""
    data = bytearray(jpeg_with_exif())
    make = data.index(b"\x01\x0f\x00\x02")  # tag 0x010F, type 2 (ASCII), big-endian as Pillow writes it
    data[make + 3] = 5  # RATIONAL
    picture = read_picture(io.BytesIO(bytes(data)), 2**30)
    assert picture.rgb.shape == (40, 20, 3) and picture.rgb[5, 10, 0] > 200  # orientation 6: red on top
    assert picture.taken == datetime(2025, 6, 1, 10, 20, 30)


def test_a_jpeg_without_exif_is_kept_as_it_is_and_dated_now(tmp_path: Path) -> None:
    out = io.BytesIO()
    Image.fromarray(np.tile(np.arange(0, 250, 10, dtype=np.uint8), (10, 1))).save(out, "JPEG", quality=95)
    path, ds = wrap(out.getvalue(), "skin", check_details(FORM, TODAY), tmp_path)
    assert dciodvfy_errors(path) == []
    assert (ds.Rows, ds.Columns) == (10, 25) and ds.AcquisitionDateTime == "20261130140506"
    grey = ds.pixel_array.astype(int)
    assert abs(grey[5, 24, 0] - 240) < 8 and (grey[..., 0] == grey[..., 2]).all()  # grey, left to right


def test_a_cmyk_jpeg_and_a_palette_png_keep_their_colours() -> None:
    red = np.zeros((16, 16, 3), np.uint8)
    red[...] = (220, 30, 40)
    for image, fmt in (
        (Image.fromarray(red).convert("CMYK"), "JPEG"),
        (Image.fromarray(red).quantize(4), "PNG"),
    ):
        out = io.BytesIO()
        image.save(out, fmt, quality=95)
        rgb = read_picture(io.BytesIO(out.getvalue()), 2**30).rgb.astype(int)
        assert np.abs(rgb[8, 8] - red[8, 8]).max() < 10, (image.mode, rgb[8, 8])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_what_a_png_leaves_transparent_is_white(mode: str) -> None:
    """As the capture page fills what lies outside its frame guide (the colour under a transparent
    pixel is no part of the picture)."""
    pixels = np.zeros((6, 6, 4), np.uint8)
    pixels[..., :3] = (10, 200, 10)
    pixels[:, :3, 3] = 255  # the left half opaque green, the right half a transparent green
    image = Image.fromarray(pixels, "RGBA")
    image = image.convert("LA") if mode == "LA" else image.convert("P") if mode == "P" else image
    out = io.BytesIO()
    image.save(out, "PNG")
    assert Image.open(io.BytesIO(out.getvalue())).mode == mode
    rgb = read_picture(io.BytesIO(out.getvalue()), 2**30).rgb
    assert rgb[:, 3:].min() == 255  # transparent: white
    assert rgb[:, :3].max() < 255 and rgb[:, :3].min() < 255  # opaque: as it was


def test_what_is_not_a_jpeg_or_png_is_no_photograph() -> None:
    with pytest.raises(NotAPhoto, match="not a readable"):
        read_picture(io.BytesIO(b"\xff\xd8\xff" + b"\x00" * 100), 2**30)
    out = io.BytesIO()
    Image.new("RGB", (600, 600)).save(out, "PNG")
    with pytest.raises(NotAPhoto, match="too large"):
        read_picture(io.BytesIO(out.getvalue()), 2**20)  # 600 x 600 x 3 bytes is over a MB


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` pixels (as a hostile file may)."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PNG")
    data = bytearray(out.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])  # width, height, then depth and the rest
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.mark.parametrize("side", [8_000, 20_000])  # over MAX_PIXELS; over Pillow's own bomb bound
def test_a_picture_claiming_a_vast_size_is_refused_before_it_is_decoded(side: int) -> None:
    with pytest.raises(NotAPhoto, match="too large"):
        read_picture(io.BytesIO(png_claiming(side, side)), 2**40)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("patient_name", "", "required"),
        ("patient_name", "A^B^C^D^E^F", "at most 5 parts"),
        ("patient_name", "Doe\\Jane", "backslash"),
        ("patient_name", "Doe^\nJane", "control characters"),
        ("patient_name", "X" * 65 + "^Jane", "64 characters"),
        ("patient_name", "a=b=c=d", "at most 3"),
        ("patient_id", "  ", "required"),
        ("patient_id", "P\t1", "control characters"),
        ("patient_id", "P" * 65, "64 characters"),
        ("patient_birth_date", "2027-01-01", "future"),
        ("patient_birth_date", "1981-02-29", "YYYY-MM-DD"),
        ("patient_birth_date", "19800101", "YYYY-MM-DD"),
        ("patient_birth_date", "1980-W01-1", "YYYY-MM-DD"),  # an ISO week date: fromisoformat takes it
        ("patient_birth_date", "1980-1-1", "YYYY-MM-DD"),
        ("patient_sex", "X", "M, F, O"),
        ("accession_number", "A" * 17, "16 characters"),
        ("laterality", "Q", "R, L, B, U"),
        ("study_uid", "1.2.abc", "UID"),
    ],
)
def test_details_dicom_cannot_hold_or_that_cannot_be_right_are_refused_by_field(
    field: str, value: str, message: str
) -> None:
    with pytest.raises(InvalidDetails) as refused:
        check_details({**FORM, field: value}, TODAY)
    [error] = refused.value.errors
    assert error["field"] == field and message in error["message"], error


def test_every_field_at_fault_is_named_at_once() -> None:
    with pytest.raises(InvalidDetails) as refused:
        check_details({"patient_name": "", "patient_id": "", "patient_sex": "?"}, TODAY)
    assert [e["field"] for e in refused.value.errors] == ["patient_name", "patient_id", "patient_sex"]
