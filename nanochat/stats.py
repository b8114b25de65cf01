"""Statistics over seeds for the experiment reports: mean +- sample std, and a t-interval of a mean.

The interval of n values is mean +- t_{(1+level)/2, n-1} * sd / sqrt(n), sd the sample standard
deviation (n - 1 in the denominator); applied to paired per-seed differences it is the paired t-test's
interval. The Student t quantile is SciPy's.
"""

import math

import scipy.stats


def mean_std(values):
    """(mean, sample std) of a list of numbers; std is None for fewer than two values, both None for none."""
    values = [float(v) for v in values]
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"non-finite value among {values}")
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def t_interval(values, level=0.95):
    """{'n', 'mean', 'sd', 'lo', 'hi', 't'}: the level-confidence t-interval of the mean of `values`
    (lo and hi are None for fewer than two values)."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    mean, sd = mean_std(values)
    n = len(values)
    if sd is None:
        return {"n": n, "mean": mean, "sd": None, "lo": None, "hi": None, "t": None}
    t = float(scipy.stats.t.ppf((1 + level) / 2, n - 1))
    half = t * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "t": t}


def paired(by_seed, reference_by_seed, op=lambda x, ref: x - ref):
    """The per-seed values op(x, ref) for the seeds both dicts have, in seed order, with those seeds."""
    seeds = sorted(set(by_seed) & set(reference_by_seed))
    return seeds, [op(by_seed[s], reference_by_seed[s]) for s in seeds]


def excludes(interval, value):
    """True when the interval lies entirely on one side of value (None when there is no interval)."""
    if interval["lo"] is None:
        return None
    return not interval["lo"] <= value <= interval["hi"]
