"""Stage 1: encode real images with a diffusion teacher into a feature bank."""
