"""Rule-based math rewards for DAPO (arXiv 2503.14476): DAPO integer rule, math-verify, GSM8K; the thread
pool that scores them off the rollout event loop (:mod:`.executor`)."""
from .extract import (
    clean_answer,
    find_answer_line,
    find_last_boxed,
    gsm8k_reference,
    normalize_integer,
    normalize_number,
)
from .executor import DEFAULT_SCORE_THREADS, get_score_executor, scoring_resources, shutdown_score_executor
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
    "DEFAULT_SCORE_THREADS",
    "get_score_executor",
    "scoring_resources",
    "shutdown_score_executor",
    "clean_answer",
    "find_answer_line",
    "find_last_boxed",
    "gsm8k_reference",
    "normalize_integer",
    "normalize_number",
]
