"""The rule ``auto`` follows when it picks a formulation, restated for the tests."""
import numpy as np


def auto_rule_holds(o) -> bool:
    """``auto``'s rule: dense, compact and sparse-initializer rank at their group's median latency (same op
    after ORT loads them), and the pick ranks within 5 % of the fastest."""
    lat = dict(o.latencies_ms)
    group = [n for n in ("dense", "compact", "sparse-initializer") if n in lat]
    g = float(np.median([lat[n] for n in group]))
    ranked = {n: (g if n in group else v) for n, v in lat.items()}
    return ranked[o.fmt] <= min(ranked.values()) * 1.05 + 1e-9
