"""The hook engine on the denoiser and batched generation with cached prefixes."""
