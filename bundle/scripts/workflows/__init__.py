"""Workflows: training, evaluation, prediction on images and slides."""
