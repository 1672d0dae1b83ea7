"""Inference on a lab's images: finding inputs, running image by image, writing each image's outputs."""
