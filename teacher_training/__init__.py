"""Stage: train a diffusion teacher (diffusers UNet2DModel + DDPM) on unlabeled domain images."""
