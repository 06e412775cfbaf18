"""Rule-based math rewards for DAPO (arXiv 2503.14476): DAPO integer rule, math-verify, GSM8K."""
from .extract import (
    clean_answer,
    find_answer_line,
    find_last_boxed,
    gsm8k_reference,
    normalize_integer,
    normalize_number,
)
from .math_verify_pool import MathVerifyPool, get_pool, shutdown_pool
from .score import (
    STATUSES,
    RewardResult,
    RewardStats,
    checker_for,
    compute_score,
    score_batch,
    summarize,
)

__all__ = [
    "RewardResult",
    "RewardStats",
    "STATUSES",
    "checker_for",
    "compute_score",
    "score_batch",
    "summarize",
    "MathVerifyPool",
    "get_pool",
    "shutdown_pool",
    "clean_answer",
    "find_answer_line",
    "find_last_boxed",
    "gsm8k_reference",
    "normalize_integer",
    "normalize_number",
]
