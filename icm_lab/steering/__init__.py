"""Steering plans and the methods that build them (ICM and its baselines)."""
