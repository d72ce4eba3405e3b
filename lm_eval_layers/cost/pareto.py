"""Which variants are worth it: the Pareto front of speed against accuracy (higher is better in
both). A point is on the front when no other point is at least as fast and at least as accurate
and better in one of the two; a point without accuracy is on no front (None)."""

from __future__ import annotations

from typing import Sequence

Point = tuple[float, float]  # (speed, accuracy)


def dominates(a: Point, b: Point) -> bool:
    return a[0] >= b[0] and a[1] >= b[1] and a != b


def front(points: Sequence[Point | None]) -> list[bool | None]:
    known = [p for p in points if p is not None]
    return [None if p is None else not any(dominates(q, p) for q in known) for p in points]
