"""Fairness, CLIP-T, CLIP-I and FID/KID metrics of base and steered images."""
