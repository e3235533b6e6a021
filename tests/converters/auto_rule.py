"""The rule ``auto`` follows when it picks a formulation, restated for the tests."""


def auto_rule_holds(o) -> bool:
    """``auto``'s rule: dense, compact and sparse-initializer rank at their group's best latency (same op
    after ORT loads them), and the pick ranks within 5 % of the fastest: so a blocked pick is never more than
    5 % slower than any measurement of the dense op. The whole-model stage may then overrule a per-layer pick
    by measurement of the whole model (its reason says so, with the ratios it saw): that is auto's rule too.
    (Its ranking itself is tested on stated medians: tests/converters/test_transformer_paths.py.)"""
    if o.reason and "the whole model" in o.reason:
        return True
    lat = dict(o.latencies_ms)
    group = [n for n in ("dense", "compact", "sparse-initializer") if n in lat]
    g = float(min(lat[n] for n in group))
    ranked = {n: (g if n in group else v) for n, v in lat.items()}
    return ranked[o.fmt] <= min(ranked.values()) * 1.05 + 1e-9
