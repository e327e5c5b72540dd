"""Labelling generated images (CLIP zero-shot, the toy oracle, FairFace) and the label table."""
