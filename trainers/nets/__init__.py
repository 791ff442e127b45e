"""Networks written in this project (StyleGAN2 in ``stylegan2.py``); the diffusion UNet comes
from diffusers (``trainers.diffusion.backbone``)."""
