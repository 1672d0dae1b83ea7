"""Bottom layer: errors, atomic writes, locks, flags, distributed, class names and colours, QuPath conventions."""
