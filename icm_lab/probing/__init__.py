"""Linear probes per (layer, step), their cross-validation splits and the saved probe set."""
