"""Random augmentation: H&E stain jitter and the batched, on-device version of train.json's augmentation."""
