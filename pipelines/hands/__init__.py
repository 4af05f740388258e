"""Giving a Hand to Diffusion Models (Pelykh et al. 2024): hands first from keypoints, then the body outpainted."""
