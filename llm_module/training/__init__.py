"""LoRA training and evaluation (being written)."""
