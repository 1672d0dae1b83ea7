"""Reading and writing files: images, nuclei outputs (label maps, GeoJSON, CSV, overlays)."""
