"""Figures of one run and the paper-style tables over many."""
