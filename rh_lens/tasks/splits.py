"""Which trials a run used, so that a ranking is judged on trials it was not computed from.

A run's settings name its items: the needles of a NIAH grid (by id) or the questions of a
real-document grid (by dataset id). Two runs overlap when they share an item, whatever the
lengths, depths or haystacks: the same fact asked again is not held out.
"""

from __future__ import annotations

from typing import Any


def split_of(settings: dict[str, Any]) -> dict[str, Any] | None:
    """The items and text of a run, from its settings; None when the settings do not say
    (a published scores file records no trials)."""
    task = settings.get("task", "niah")
    items = settings.get("questions") if task != "niah" else settings.get("needles")
    if not items:
        return None
    text = {"data_sha256": settings.get("data_sha256")} if task != "niah" else {"haystack": settings.get("haystack")}
    return {"task": task, "items": [f"{task}:{item}" for item in items], **text}


def shared_items(ranked_on: dict[str, Any] | None, evaluated_on: dict[str, Any] | None) -> list[str] | None:
    """The items two splits share (sorted), or None when either split is unknown."""
    if ranked_on is None or evaluated_on is None:
        return None
    return sorted(set(ranked_on["items"]) & set(evaluated_on["items"]))
