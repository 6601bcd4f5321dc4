"""Table-2-style summary rows (spec §5): Avg is the plain mean of the task numbers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal

from ..errors import MetricError, MetricKeyError

__all__ = ["format_score", "markdown_header", "summarize_row"]


def format_score(x: float, digits: int = 2) -> str:
    """Round half up on the shortest decimal form of ``x`` (79.185 -> "79.19", like the paper)."""
    q = Decimal(1).scaleb(-digits)
    return str(Decimal(repr(float(x))).quantize(q, rounding=ROUND_HALF_UP))


def summarize_row(
    scores: Mapping[str, float],
    *,
    label: str | None = None,
    tasks: Sequence[str] | None = None,
    digits: int = 2,
) -> tuple[float, str]:
    """Return ``(avg, markdown_row)`` for task -> score (e.g. VQA, GQA, NLVR2, COCO CIDEr).

    ``avg`` is the unrounded plain mean over ``tasks`` (default: all keys, in order). The row is
    ``| label | s1 | s2 | ... | avg |`` with ``digits`` decimals (the label cell only if given).
    Check from the spec: (66.17 + 55.11 + 73.43 + 122.03) / 4 = 79.19.
    """
    names = list(tasks) if tasks is not None else list(scores)
    if not names:
        raise MetricError("summarize_row needs at least one task score")
    missing = [t for t in names if t not in scores]
    if missing:
        raise MetricKeyError(f"missing task score(s): {missing}")
    values = [float(scores[t]) for t in names]
    avg = sum(values) / len(values)
    cells = ([label] if label is not None else []) + [format_score(v, digits) for v in values]
    cells.append(format_score(avg, digits))
    return avg, "| " + " | ".join(cells) + " |"


def markdown_header(tasks: Sequence[str], *, label: str | None = "Method") -> str:
    """The header and separator lines matching :func:`summarize_row`."""
    cols = ([label] if label is not None else []) + list(tasks) + ["Avg"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)
