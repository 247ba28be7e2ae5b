"""``deltakern bench``'s machinery: the harness (``harness``), one case module per op (``cases``),
the end-to-end training step (``e2e``)."""
