"""Data: demo task generation, verl-schema row loading, prompt sampling/rendering, demo tokenizer,
tiny random-initialised checkpoints.  Heavy dependencies (transformers, torch, tokenizers) are imported
lazily inside the functions that need them."""
from .dataset import (PromptDataset, PromptSkipStats, PromptTooLong, RowValidationError, demo_rows, load_rows,
                      render_batch, render_prompt, val_rows, validate_row)
from .tasks import format_dapo_prompt, generate_tasks, write_rows
from .tiny_checkpoint import make_tiny_checkpoint
from .tokenizer import (last_answer_integer, load_tokenizer, stop_token_ids, train_demo_tokenizer,
                        uniform_policy_accuracy)

__all__ = [
    "PromptDataset", "PromptSkipStats", "PromptTooLong", "RowValidationError", "demo_rows", "load_rows",
    "render_batch", "render_prompt", "val_rows", "validate_row", "format_dapo_prompt", "generate_tasks", "write_rows",
    "make_tiny_checkpoint", "last_answer_integer", "load_tokenizer", "stop_token_ids",
    "train_demo_tokenizer", "uniform_policy_accuracy",
]
