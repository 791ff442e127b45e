"""Diffusion methods and their shared backbone (diffusers UNet2DModel + DDPM/DDIM schedulers)."""
