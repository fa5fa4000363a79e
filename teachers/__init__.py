"""Diffusion teachers: a model-family-agnostic interface, feature taps and the encoding algorithms."""
