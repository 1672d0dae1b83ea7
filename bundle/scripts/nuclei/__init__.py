"""Nuclei: training targets from instance maps, the output head and its loss, post-processing into instances, TTA."""
