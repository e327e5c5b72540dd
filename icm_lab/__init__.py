"""icm_lab: find where text-to-image diffusion models make implicit choices, and change them."""

__version__ = "0.1.0"
