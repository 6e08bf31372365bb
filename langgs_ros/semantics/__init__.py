"""Semantic lifting: per-pixel instance ids + per-instance language embeddings (see :mod:`.base`)."""
