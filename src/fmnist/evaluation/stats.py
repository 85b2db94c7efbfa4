"""Whether a difference is real: means with their 95% confidence intervals, and Welch's t-test
between two sets of runs (SciPy's t distribution), or the paired t-test between two sets of
runs that share their seeds.

With the few seeds a CPU budget buys (3 or 5), an interval is wide: the t distribution with
n - 1 degrees of freedom says how wide. Welch's test does not assume the two recipes vary by
the same amount from seed to seed. Runs with the same seed share what the seed decides (the
validation split, the initial weights, the order of the batches), and on validation accuracy
that is most of the spread: a paired test of the per-seed differences sees a smaller real
difference than Welch's with the same runs.
"""

from __future__ import annotations

import math
import statistics

CONFIDENCE = 0.95


def spread(values: list[float], confidence: float = CONFIDENCE) -> dict:
    """Mean, standard deviation, range and the confidence interval of the mean (None for one value)."""
    from scipy import stats

    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values),
            "ci_low": None if half is None else float(mean - half),
            "ci_high": None if half is None else float(mean + half), "confidence": confidence}


def welch(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> dict:
    """Welch's t-test of mean(b) - mean(a): the difference, its confidence interval, t, the
    Welch-Satterthwaite degrees of freedom and the two-sided p-value."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return {"difference": statistics.fmean(b) - statistics.fmean(a), "p_value": None, "significant": None,
                "note": "needs at least two runs on each side"}
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    difference = statistics.fmean(b) - statistics.fmean(a)
    if va + vb == 0:  # every run alike on each side (as the paired test's "same amount"): no test
        return {"difference": _rounding_is_zero(difference, a + b), "p_value": None, "significant": None,
                "note": "every run on each side gave the same value: no spread to test against"}
    share_a, share_b = va / (va + vb), vb / (va + vb)  # the Welch-Satterthwaite df from shares:
    df = 1 / (share_a ** 2 / (len(a) - 1) + share_b ** 2 / (len(b) - 1))  # no square over- or underflows
    t = difference / math.sqrt(va + vb)
    p = 2 * stats.t.sf(abs(t), df)
    half = stats.t.ppf((1 + confidence) / 2, df) * math.sqrt(va + vb)
    return {"difference": difference, "ci_low": float(difference - half), "ci_high": float(difference + half),
            "t": t, "df": df, "p_value": float(p), "significant": bool(p < 1 - confidence), "confidence": confidence}


def paired(a: dict, b: dict, confidence: float = CONFIDENCE) -> dict:
    """The paired t-test of b - a over the seeds both have (``{seed: value}`` each): the mean
    difference, its confidence interval, t, n - 1 degrees of freedom and the two-sided p-value."""
    from scipy import stats

    seeds = sorted(a.keys() & b.keys())
    differences = [b[seed] - a[seed] for seed in seeds]
    if len(differences) < 2:
        return {"difference": statistics.fmean(differences) if differences else None, "p_value": None,
                "significant": None, "n": len(differences), "note": "needs at least two seeds on both sides"}
    summary = spread(differences, confidence)
    difference, std, n = summary["mean"], summary["std"], len(differences)
    # Every seed moved by the same amount (a few seeds, accuracy in steps of one image): the
    # spread left is float rounding of the differences, which must not decide the verdict.
    if _rounding_is_zero(std, differences + [*a.values(), *b.values()]) == 0:
        return {"difference": _rounding_is_zero(difference, [*a.values(), *b.values()]), "p_value": None,
                "significant": None, "n": n,
                "note": f"every one of the {n} seeds moved by the same amount: no spread to test against"}
    t = difference / (std / math.sqrt(n))
    p = 2 * stats.t.sf(abs(t), n - 1)
    return {"difference": difference, "ci_low": summary["ci_low"], "ci_high": summary["ci_high"], "n": n,
            "t": t, "df": n - 1, "p_value": float(p), "significant": bool(p < 1 - confidence),
            "confidence": confidence}


def _rounding_is_zero(difference: float, values: list[float]) -> float:
    """0.0 for a difference of means that is only rounding (the mean of three 0.99s need not
    be the float 0.99): where nothing varies, any difference left decides the verdict alone."""
    return 0.0 if abs(difference) <= 1e-12 * max(1.0, *map(abs, values)) else difference
