"""Diffusion models for images: UNet, noise schedulers, pipelines."""
