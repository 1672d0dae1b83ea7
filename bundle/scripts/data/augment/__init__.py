"""Augmentation: stain jitter, batch augmentation on the device."""
