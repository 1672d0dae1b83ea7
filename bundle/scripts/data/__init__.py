"""Data layer: PanNuke folds, the cache, the converter, the one image reader, augmentation."""
