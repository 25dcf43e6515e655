"""Shared by the benchmarks: a table of scores, mean ± std over seeds, one row per method."""

from __future__ import annotations

import numpy as np

__all__ = ["print_seed_table"]


def print_seed_table(
    rows: dict[str, list[dict[str, float]]],
    keys: tuple[str, ...],
    seconds: dict[str, list[float]],
    *,
    width: int,
    column: int,
    time_column: int,
) -> None:
    """Print ``rows`` (label -> one score dict per seed): mean ± std of each of
    ``keys`` (the value alone for one seed) and the mean of ``seconds[label]``."""
    head = f"{'method':<{width}}" + "".join(f"{k:>{column}}" for k in keys)
    head += f"{'train s':>{time_column}}"
    print(head)
    print("-" * len(head))
    for label, runs in rows.items():
        cells = []
        for k in keys:
            v = np.array([r[k] for r in runs])
            cells.append(f"{v.mean():.4f} ± {v.std():.4f}" if len(v) > 1 else f"{v[0]:.4f}")
        t = f"{np.mean(seconds[label]):.0f}" if label in seconds else "-"
        print(
            f"{label:<{width}}" + "".join(f"{c:>{column}}" for c in cells) + f"{t:>{time_column}}"
        )
