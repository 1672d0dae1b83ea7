"""Training and run plumbing: checkpoints, resume, handlers, tracking, the shipped weights."""
