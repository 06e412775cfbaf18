"""Demo task generator: easy integer-answer arithmetic in the DAPO-Math-17k (verl) row schema.

Every row looks like a DAPO-Math-17k row (verl "RL dataset" layout, see
``verl/utils/dataset/rl_dataset.py`` and the DAPO-Math-17k parquet)::

    {"data_source": "arith_demo",
     "prompt": [{"role": "user", "content": <DAPO instruction + problem>}],
     "ability": "MATH",
     "reward_model": {"ground_truth": "7", "style": "rule"},
     "extra_info": {"index": i}}

The user content wraps the problem in the same instruction DAPO-Math-17k uses (checked against
``dapo_math_17k.parquet``: every one of its 17,917 rows starts with :data:`DAPO_INSTRUCTION_PREFIX`
and ends with :data:`DAPO_INSTRUCTION_SUFFIX`).

Problems are deliberately easy ("What is 3 + 4?", "What is 7 - 2?") with answers in 0..9, so a tiny
model can learn them within a few RL steps.  Problems are drawn uniformly from the 110 (operator, a, b)
combinations with single-digit operands and a single-digit non-negative result (55 additions with
``a + b <= 9`` and 55 subtractions with ``a >= b``); that makes every answer 0..9 equally likely
(addition gives answer ``s`` in ``s + 1`` ways, subtraction in ``10 - s`` ways: 11 ways each in total).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable

DATA_SOURCE = "arith_demo"
ABILITY = "MATH"
REWARD_STYLE = "rule"

#: First paragraph of every DAPO-Math-17k prompt (followed by a blank line and the problem).
DAPO_INSTRUCTION_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
)
#: Last paragraph of every DAPO-Math-17k prompt (preceded by a blank line).
DAPO_INSTRUCTION_SUFFIX = 'Remember to put your answer on its own line after "Answer:".'

#: Single-digit problems: (operator, a, b) with the result in 0..9.
_PROBLEMS: tuple[tuple[str, int, int], ...] = tuple(
    [("+", a, b) for a in range(10) for b in range(10) if a + b <= 9]
    + [("-", a, b) for a in range(10) for b in range(10) if a >= b]
)


def format_dapo_prompt(problem: str) -> str:
    """Wrap ``problem`` in the DAPO-Math-17k instruction.

    Returns ``PREFIX + "\\n\\n" + problem + "\\n\\n" + SUFFIX`` exactly as in the DAPO-Math-17k rows.
    Raises ``ValueError`` for an empty problem.
    """
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"problem must be a non-empty string, got {problem!r}")
    return f"{DAPO_INSTRUCTION_PREFIX}\n\n{problem}\n\n{DAPO_INSTRUCTION_SUFFIX}"


def solve_problem(op: str, a: int, b: int) -> int:
    """Return ``a + b`` or ``a - b``; ``ValueError`` for any other operator."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    raise ValueError(f"unsupported operator {op!r} (expected '+' or '-')")


def generate_tasks(num_rows: int, seed: int = 0, *, data_source: str = DATA_SOURCE) -> list[dict]:
    """Generate ``num_rows`` demo rows in the verl / DAPO-Math-17k schema.

    Args:
        num_rows: number of rows (>= 0).
        seed: seed of the private ``random.Random`` used to draw problems (same seed → same rows).
        data_source: value of the ``data_source`` field (default ``"arith_demo"``).

    Returns:
        list of dicts with keys ``data_source`` (str), ``prompt`` (one user message),
        ``ability`` ("MATH"), ``reward_model`` ({"ground_truth": "<int 0..9>", "style": "rule"}),
        ``extra_info`` ({"index": i}, i = 0..num_rows-1).

    Raises:
        ValueError: ``num_rows`` negative or not an int.
    """
    if not isinstance(num_rows, int) or isinstance(num_rows, bool) or num_rows < 0:
        raise ValueError(f"num_rows must be a non-negative int, got {num_rows!r}")
    rng = random.Random(int(seed))
    rows: list[dict] = []
    for i in range(num_rows):
        op, a, b = rng.choice(_PROBLEMS)
        problem = f"What is {a} {op} {b}?"
        rows.append(
            {
                "data_source": data_source,
                "prompt": [{"role": "user", "content": format_dapo_prompt(problem)}],
                "ability": ABILITY,
                "reward_model": {"ground_truth": str(solve_problem(op, a, b)), "style": REWARD_STYLE},
                "extra_info": {"index": i},
            }
        )
    return rows


def write_rows(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows to ``path``: ``.jsonl`` (one JSON object per line) or ``.parquet`` (pyarrow).

    The parent directory is created.  Returns the path.  Raises ``ValueError`` for any other suffix
    or for an empty ``rows`` with ``.parquet`` (pyarrow cannot infer a schema from no rows).
    """
    path = Path(path)
    rows = list(rows)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{path}: unsupported suffix {path.suffix!r}; use .jsonl or .parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        if not rows:
            raise ValueError(f"{path}: cannot write an empty parquet file (no schema)")
        # heavy: pyarrow, only for parquet files
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path
