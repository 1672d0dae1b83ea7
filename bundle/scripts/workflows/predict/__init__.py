"""Prediction on images: inputs, per-image isolation, the nucleus record and its writers."""
