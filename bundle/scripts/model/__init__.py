"""Model layer: training targets, head and loss, post-processing, TTA, loading weights."""
