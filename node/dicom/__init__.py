"""DICOM plumbing the node's stages share: Application Entities for listening and sending, rendering a
stored image for display, the attributes several stages read (laterality, orientation), and the header
routing keeps in the database."""
