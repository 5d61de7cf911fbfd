"""Space-group statistics of a set of structures (spglib at symprec 0.1 and 0.01)."""

from __future__ import annotations

from collections import Counter


def space_group_statistics(space_groups: list[int | None], stated: list[int | None] | None = None) -> dict:
    """P1 fraction, histogram and (where stated groups are given) stated-vs-detected agreement.

    `space_groups` holds the detected number of each structure (None: spglib found none, counted as P1).

    >>> space_group_statistics([225, 1, 225, None], stated=[225, 2, 221, None])
    {'p1_fraction': 0.5, 'histogram': {1: 2, 225: 2}, 'distinct': 2, 'stated_agreement': 0.3333333333333333}
    """
    detected = [number or 1 for number in space_groups]
    result = {
        "p1_fraction": sum(number == 1 for number in detected) / len(detected) if detected else 0.0,
        "histogram": dict(sorted(Counter(detected).items())),
        "distinct": len(set(detected)),
    }
    if stated is not None:
        pairs = [(s, d) for s, d in zip(stated, detected) if s is not None]
        result["stated_agreement"] = sum(s == d for s, d in pairs) / len(pairs) if pairs else None
    return result
