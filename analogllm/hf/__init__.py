"""Hugging Face integration: built-in and pretrained models (:mod:`.models`), analogue checkpoints
(:mod:`.checkpoint`)."""
