"""Scoring: the official PanNuke PQ, validation metrics, the evaluation handler and the 3-split protocol."""
