"""The front door: every way an instance comes in — the DICOM listener (:mod:`.scp`), reconciliation of
the spool after a crash, later uploads — goes through one :class:`~node.ingest.accept.Ingest`: checks,
durable spool write, arrival, index (:mod:`.index`); :mod:`.completion` decides when a series is
complete."""
