"""The structured config (schema) and composing it outside `@hydra.main`."""
