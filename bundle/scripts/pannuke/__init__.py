"""PanNuke data: the format, finding and checking folds, the tile cache, MONAI datasets, demo data, the converter."""
