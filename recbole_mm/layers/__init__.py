"""Shared layers: sequence encoders (the seed papers' SASRec block), item towers, fusion."""
