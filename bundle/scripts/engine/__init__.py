"""The training engine around MONAI: checkpoints, handlers, torchrun plumbing, TensorBoard panels, shipped weights."""
