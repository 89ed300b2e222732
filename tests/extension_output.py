"""A throw-away output writer, registered from its own module as a plug-in would be: a Key Object
Selection that flags the images the model's findings rest on (DICOM's "key images")."""

from __future__ import annotations

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from node.outputs import OutputContext, register_output


@register_output("key-images", kind="KO", series_number=9010, series_description="AI key images: {task}")
def key_images(context: OutputContext) -> list[Dataset]:
    analysis = context.analysis
    flagged = [explanation.source for explanation in analysis.explanations] or list(analysis.sources[:1])
    document = hd.ko.KeyObjectSelectionDocument(
        evidence=flagged,
        content=hd.ko.KeyObjectSelection(
            document_title=codes.DCM.OfInterest,
            referenced_objects=flagged,
            description=context.series_description,
        ),
        series_instance_uid=generate_uid(),
        series_number=context.series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=context.model.manufacturer,
    )
    document.SeriesDescription = context.series_description
    return [document]
