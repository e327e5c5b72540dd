"""Files on disk: atomic writes, sealed artefacts, the activation store, experiment tracking."""
