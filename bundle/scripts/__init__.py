"""Custom code of the PanNuke nuclei bundle: one module per job (loading, targets, post-processing, metrics, ...)."""
