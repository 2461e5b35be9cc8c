"""LoRA training and evaluation behind llm.train and llm.evaluate."""

from .checkpoints import check_output_dir
from .evaluate import evaluate_model
from .trainer import train_adapter

__all__ = ["check_output_dir", "evaluate_model", "train_adapter"]
