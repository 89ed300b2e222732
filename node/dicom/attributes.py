"""Attributes more than one stage reads, read one way: which eye or side an image shows, and which way
its rows and columns point in the patient."""

from __future__ import annotations

import numpy as np
from pydicom import Dataset

_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, +y, +z of the patient coordinate system


def laterality(ds: Dataset) -> str | None:
    """ "R" or "L": the image's own Image Laterality first (it is the more specific), else the series'
    Laterality; None when neither names a side (absent, "U" unpaired, "B" both)."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("R", "L"):
            return value
    return None


def patient_orientation(ds: Dataset) -> tuple[str, str] | None:
    """The patient directions of the rows and the columns by their main axis, from Patient Orientation
    if given, else from Image Orientation (Patient); None when neither says."""
    given = ds.get("PatientOrientation")
    if given and len(given) == 2 and all(given):
        return str(given[0])[0], str(given[1])[0]
    cosines = ds.get("ImageOrientationPatient")
    if not cosines or len(cosines) != 6:
        return None
    letters = []
    for vector in (cosines[:3], cosines[3:]):
        axis = int(np.argmax(np.abs(vector)))
        letters.append(_AXIS_LETTERS[axis][0 if float(vector[axis]) > 0 else 1])
    return letters[0], letters[1]
