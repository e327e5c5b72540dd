"""Model families: loading pipelines and CLIP, the family adapters that name hook points, tiny
twins."""
