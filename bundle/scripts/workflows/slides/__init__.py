"""Prediction on whole slides: readers, tissue, tile grid, tiles, writer, progress."""
