"""Tensor parallelism: the rank group, its collectives, and how a model is split over ranks."""
