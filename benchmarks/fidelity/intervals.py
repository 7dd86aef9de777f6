"""Bootstrap intervals of the fidelity scores: a task's samples are drawn with replacement, the
same draws for every policy (seeded by the task's name), so that a policy's change against the
full cache is paired by sample and two policies are compared on the same draws."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def draws(task: str, num_samples: int, resamples: int = RESAMPLES) -> np.ndarray:
    """``[resamples, num_samples]`` sample indices of one task (the same for every policy)."""
    rng = np.random.default_rng(zlib.crc32(task.encode()))
    return rng.integers(0, num_samples, size=(resamples, num_samples))


def interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    """Percentile interval ``[low, high]`` of bootstrap statistics."""
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def mean_draws(values: Sequence[float], index: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)[index].mean(axis=1)


def rel_change_draws(scores: Sequence[float], full_scores: Sequence[float],
                     index: np.ndarray) -> np.ndarray | None:
    """Relative change score / full-cache score − 1 in every draw, paired by sample; None when
    the full cache scores 0 on the task (nothing to preserve). A draw whose full-cache mean is
    0 counts as no change."""
    if not any(full_scores):
        return None
    full = mean_draws(full_scores, index)
    score = mean_draws(scores, index)
    return np.divide(score, full, out=np.ones_like(score), where=full > 0) - 1.0


def task_intervals(task: str, scores: Sequence[float], full_scores: Sequence[float]
                   ) -> dict[str, list[float] | None]:
    index = draws(task, len(scores))
    changes = rel_change_draws(scores, full_scores, index)
    return {"score_ci": interval(mean_draws(scores, index)),
            "rel_change_ci": None if changes is None else interval(changes)}


def summary_intervals(per_task: Mapping[str, Mapping[str, Sequence[float]]]
                      ) -> dict[str, list[float] | None]:
    """Intervals of the mean and of the worst per-task change over ``per_task`` (task →
    ``{"scores", "full_scores"}``); tasks whose full cache scores 0 are left out."""
    changes = []
    for task, samples in per_task.items():
        index = draws(task, len(samples["scores"]))
        task_changes = rel_change_draws(samples["scores"], samples["full_scores"], index)
        if task_changes is not None:
            changes.append(task_changes)
    if not changes:
        return {"mean_rel_change_ci": None, "worst_rel_change_ci": None}
    stacked = np.stack(changes)
    return {"mean_rel_change_ci": interval(stacked.mean(axis=0)),
            "worst_rel_change_ci": interval(stacked.min(axis=0))}
