"""Scoring: official PanNuke PQ per image, tissue and split."""
