"""Statistics over seeds for the experiment reports: mean +- sample std, and a t-interval of a mean.

The interval of n values is mean +- t_{(1+level)/2, n-1} * sd / sqrt(n), sd the sample standard
deviation (n - 1 in the denominator); applied to paired per-seed differences it is the paired t-test's
interval. The Student t quantile is computed here, without scipy: for an integer number of degrees of
freedom the two-sided probability P(|T| <= t) has a closed form (a finite trigonometric series in
theta = atan(t / sqrt(df)), Abramowitz & Stegun 26.7.3 and 26.7.4), and the quantile is found by
bisection on it. tests/test_evidence.py checks it against scipy.stats.t.ppf.
"""

import math


def t_two_sided(t, df):
    """P(|T| <= t) for Student's t with `df` (a positive integer) degrees of freedom, t >= 0."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), up to cos^(df-2)
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for j in range(1, (df - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    term, total = 1.0, 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), up to cos^(df-2)
    for j in range(1, df // 2):
        term *= c2 * (2 * j - 1) / (2 * j)
        total += term
    return math.sin(theta) * total


def t_quantile(p, df):
    """The p-quantile of Student's t with integer df degrees of freedom, for 0.5 <= p < 1."""
    if not 0.5 <= p < 1:
        raise ValueError(f"p must lie in [0.5, 1), got {p}")
    target = 2 * p - 1
    lo, hi = 0.0, 1.0
    while t_two_sided(hi, df) < target:
        lo, hi = hi, 2 * hi
    for _ in range(200):  # bisection to float precision
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_two_sided(mid, df) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


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
    mean, sd = mean_std(values)
    n = len(values)
    if sd is None:
        return {"n": n, "mean": mean, "sd": None, "lo": None, "hi": None, "t": None}
    t = t_quantile((1 + level) / 2, n - 1)
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
