"""Power-law fits t ≈ c W^k of the gradient cost, and the extrapolation beyond what was timed.

A point is ``{"W": int, "loss_pass": s, "backprop": s, "central_difference": s,
"forward_difference": s}`` (seconds; a method missing or None where it was not
timed). A method is fitted only over its *proportional* points, where one pass
through the net costs at least ``OVERHEAD_FACTOR`` times the method's fixed cost
per pass (``floors``: the same method timed on a net with no work to speak of),
so the fixed cost shifts the fitted slope by at most a few hundredths.
"""

from __future__ import annotations

import numpy as np

METHODS = ("backprop", "central_difference", "forward_difference")
OVERHEAD_FACTOR = 8.0  # a pass counts once it costs 8x the fixed cost of a pass

# passes through the net per gradient: one forward and one backward for backprop,
# W (forward) or 2W (central) loss evaluations for finite differences
PASSES = {"backprop": lambda W: 1, "forward_difference": lambda W: W, "central_difference": lambda W: 2 * W}


def fit_power_law(W, t) -> dict:
    """Least-squares line through (log10 W, log10 t): t ≈ c W^k, with R² of that line."""
    x, y = np.log10(np.asarray(W, dtype=float)), np.log10(np.asarray(t, dtype=float))
    k, log_c = np.polyfit(x, y, 1)
    residual, spread = float(np.sum((y - (k * x + log_c)) ** 2)), float(np.sum((y - y.mean()) ** 2))
    return {
        "exponent": float(k),
        "prefactor": float(10**log_c),
        "fit_range": [int(min(W)), int(max(W))],
        "n_points": len(W),
        "r2": 1.0 - residual / spread if spread > 0 else 1.0,
    }


def proportional_points(points: list[dict], method: str, floor: float | None = None) -> list[dict]:
    """The points whose time per pass is at least OVERHEAD_FACTOR times ``floor`` (the
    method's fixed cost per pass; without it, the smallest timed net's time per pass)."""
    timed = [p for p in points if p.get(method) is not None]
    if not timed:
        return []
    if floor is None:
        floor = timed[0][method] / PASSES[method](timed[0]["W"])
    return [p for p in timed if p[method] / PASSES[method](p["W"]) >= OVERHEAD_FACTOR * floor]


def fit_gradient_cost(points: list[dict], floors: dict[str, float] | None = None) -> dict:
    """Exponents per method over its own proportional range, and over the range
    common to the three methods (the headline ``exponents`` / ``fit_range``: every
    point in it has all three methods measured, none extrapolated)."""
    own = {}
    for method in METHODS:
        pts = proportional_points(points, method, (floors or {}).get(method))
        if len(pts) < 2:  # never proportional within the budget: fit the largest points
            pts = [p for p in points if p.get(method) is not None][-3:]
        own[method] = fit_power_law([p["W"] for p in pts], [p[method] for p in pts]) if len(pts) >= 2 else None
    bounds = [own[m]["fit_range"] for m in METHODS if own[m]]
    lo, hi = max(b[0] for b in bounds), min(b[1] for b in bounds)
    common_pts = [p for p in points if lo <= p["W"] <= hi and all(p.get(m) is not None for m in METHODS)]
    common = None
    if len(common_pts) >= 2:
        common = {m: fit_power_law([p["W"] for p in common_pts], [p[m] for p in common_pts]) for m in METHODS}
        exponents = {m: common[m]["exponent"] for m in METHODS}
        fit_range = [common_pts[0]["W"], common_pts[-1]["W"]]
    else:  # no overlap: report each method's own fit, over the union of the ranges
        exponents = {m: own[m]["exponent"] if own[m] else None for m in METHODS}
        fit_range = [min(b[0] for b in bounds), max(b[1] for b in bounds)]
    return {
        "exponents": exponents,
        "fit_range": fit_range,
        "common_fit_points": len(common_pts),
        "fit_range_is_common": common is not None,
        "r2": {m: common[m]["r2"] for m in METHODS} if common else None,
        "fits": own,
        "extrapolated": extrapolate_differences(points),
    }


def extrapolate_differences(points: list[dict]) -> list[dict]:
    """Finite-difference times beyond the budget, estimated (not measured): the number
    of loss evaluations times one loss evaluation timed at that W, scaled by the
    ratio measured at the largest W where the method itself was timed."""
    rows: dict[int, dict] = {}
    for method in METHODS[1:]:
        timed = [p for p in points if p.get(method) is not None]
        if not timed:
            continue
        last = timed[-1]
        scale = last[method] / (PASSES[method](last["W"]) * last["loss_pass"])
        for p in points:
            if p["W"] > last["W"]:
                rows.setdefault(p["W"], {"W": p["W"]})[method] = scale * PASSES[method](p["W"]) * p["loss_pass"]
    return [rows[W] for W in sorted(rows)]
