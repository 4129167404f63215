"""Offline data preparation: image preprocessing, the image VAE, sharding jobs."""
