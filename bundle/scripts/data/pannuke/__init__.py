"""PanNuke folds on disk: format, files, cache, datasets, the converter, QuPath annotations."""
