"""Results in the source's character set: the patient and study identity as the source's own bytes,
and the node's own text fitted to that set.

A result joins the source's study, so a PACS files it, and a viewer heads it, by the source's patient
and study attributes. Decoding them and encoding them again is not enough: encoders differ in where
they put ISO 2022 escape sequences (once per value or once per name component), whether they switch
back to ASCII at the end, how they pad and whether they keep empty trailing name groups, and a PACS
that compares bytes would see another patient. highdicom cannot even spell some sets: it refuses the
empty first value (``\\ISO 2022 IR 149``, as Korean sites send it) and misspells IR 149 as IR 159.
So the writers build their objects without a Specific Character Set (``specific_character_set=None``) and
:meth:`SourceIdentity.apply` then gives every result

- the source's Specific Character Set, exactly as the source has it (absent: the default repertoire);
- the elements of :data:`IDENTITY` the source has, with the source's bytes, which pydicom writes as
  they are: text values as bytes, person names with the source's bytes as their original string,
  sequences item by item;
- the node's own text (series description, report text, code meanings, model names) fitted to that
  set: a character the set cannot encode is replaced by its ASCII form, accents dropped ("é" → "e",
  "ß" → "ss", "–" → "-"), or by "?" where it has none (a Hangul syllable in a Latin-1 result).
  The patient's identity is never re-encoded or transliterated.
"""

from __future__ import annotations

import copy
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.multival import MultiValue
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR, VR, PersonName

# The source's identity every result carries: the attributes of the Patient, General Study and Patient
# Study modules (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2) that name the patient and the study, the
# de-identification flags (a result of a de-identified source must say so too), and the physicians the
# study is filed under. Study Instance UID is set by every writer. Equipment (Institution Name) is the
# series' and not the study's: each result names its own.
IDENTITY: tuple[str, ...] = (
    # Patient
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    # General Study
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ConsultingPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    # Patient Study
    "PatientAge",
)
# The multi-byte sets with code extensions (PS3.3 Table C.12-4): never the first value, in which
# text starts; some Korean sites send "ISO 2022 IR 149" alone all the same.
_MULTI_BYTE = {"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58"}
# ASCII for the letters and marks that Unicode does not decompose into a letter and accents.
_SPELLED = {"ß": "ss", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L"}
_SPELLED |= {"đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "TH", "ı": "i", "–": "-", "—": "-"}
_SPELLED |= {"‘": "'", "’": "'", "“": '"', "”": '"', "«": '"', "»": '"', "·": ".", "•": "*", "×": "x"}
_TEXT = CUSTOMIZABLE_CHARSET_VR - {VR.PN}  # SH, LO, ST, LT, UC, UT: their values are kept as bytes


@dataclass(frozen=True)
class SourceIdentity:
    """A source's Specific Character Set and identity elements, as received."""

    charset: DataElement | None  # None: the default repertoire
    elements: tuple[DataElement, ...]

    @classmethod
    def of(cls, source: Dataset) -> SourceIdentity:
        """Take them before anything decodes the source's values (highdicom reads the patient's name
        from the source): a decoded element has lost its bytes."""
        encodings = convert_encodings(source.get("SpecificCharacterSet"))
        charset = source.get_item("SpecificCharacterSet")
        elements = tuple(
            _as_received(element, encodings, source)
            for keyword in IDENTITY
            if (element := source.get_item(keyword)) is not None
        )
        return cls(None if charset is None else _as_received(charset, encodings, source), elements)

    def apply(self, result: Dataset) -> None:
        """Make ``result`` the source's in identity and character set, in that order: the node's
        text is fitted first, so the identity is never touched."""
        codecs = self._codecs()
        for element in result.iterall():
            if element.VR in CUSTOMIZABLE_CHARSET_VR and not element.is_empty:
                _fit(element, codecs)
        if self.charset is None:
            result.pop("SpecificCharacterSet", None)
        else:
            result["SpecificCharacterSet"] = copy.deepcopy(self.charset)
        for element in self.elements:
            result[element.tag] = copy.deepcopy(element)

    def _codecs(self) -> list[str]:
        """The Python codecs of the sets the node's own text may use: the source's, the default
        repertoire meaning ASCII, less a multi-byte set in first place, which writers would encode
        without the escape sequence it needs."""
        value = [] if self.charset is None else self.charset.value
        values = [value] if isinstance(value, str) else list(value)
        sets = ["", *values[1:]] if values and values[0] in _MULTI_BYTE else values
        return ["ascii" if codec == default_encoding else codec for codec in convert_encodings(sets)]


def _as_received(element: DataElement | RawDataElement, encodings: list[str], parent: Dataset) -> DataElement:
    """An element whose value pydicom writes back as the bytes it was read from. One already decoded
    is taken as decoded (a person name keeps its original bytes, less their padding)."""
    if isinstance(element, RawDataElement):
        raw = element.value
        element = convert_raw_data_element(element, encoding=encodings, ds=parent)
        if raw and element.VR == VR.PN:
            element.value = PersonName(raw, encodings)
        elif raw and element.VR in _TEXT:
            element.value = raw
    else:
        element = copy.deepcopy(element)
    if element.VR == VR.SQ:
        element.value = [_item_as_received(item, encodings) for item in element.value]
    return element


def _item_as_received(item: Dataset, encodings: list[str]) -> Dataset:
    copied = Dataset()
    for tag in sorted(item.keys()):  # the tags: iterating a Dataset decodes its elements
        copied[tag] = _as_received(item.get_item(tag), encodings, item)
    return copied


def _fit(element: DataElement, codecs: Sequence[str]) -> None:
    """Transliterate what ``codecs`` cannot encode in a text element. ASCII, which every DICOM
    character set has, is left alone, and so are bytes, which are written as they are."""
    values = list(element.value) if isinstance(element.value, MultiValue) else [element.value]
    texts = [value if isinstance(value, bytes) else str(value) for value in values]
    fitted = [
        text if isinstance(text, bytes) or text.isascii() else transliterate(text, codecs) for text in texts
    ]
    if fitted != texts:
        element.value = fitted if len(fitted) > 1 else fitted[0]  # a PN's str becomes a PersonName


def transliterate(text: str, codecs: Sequence[str] = ("ascii",)) -> str:
    """``text`` with each character that none of ``codecs`` encodes spelled in ASCII: "Hämorrhagie"
    becomes "Hamorrhagie", "ß" "ss", a character with no spelling "?"."""
    return "".join(_fitted(character, codecs) for character in text)


def _fitted(character: str, codecs: Sequence[str]) -> str:
    for codec in codecs:
        try:
            character.encode(codec)
        except (UnicodeEncodeError, LookupError):
            continue
        return character
    if character in _SPELLED:
        return _SPELLED[character]
    return unicodedata.normalize("NFKD", character).encode("ascii", "ignore").decode("ascii") or "?"
