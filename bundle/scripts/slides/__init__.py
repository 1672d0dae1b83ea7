"""Whole slides: reading any scanner's slide at the model's scale, finding tissue, tiling it, and writing typed nuclei
for QuPath as the tiles finish."""
