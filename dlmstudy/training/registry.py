"""The objectives by registry name: the plain ones (objectives.py) and their exact fast-head twins (heads.py)."""

from __future__ import annotations

from dlmstudy.training.heads import FastARObjective, FastMDMObjective
from dlmstudy.training.objectives import ARObjective, MDMObjective

OBJECTIVES = {"mdm": MDMObjective, "ar": ARObjective}
FAST_OBJECTIVES = {"mdm": FastMDMObjective, "ar": FastARObjective}


def build_objective(name: str, *, fast_head: bool = False, **settings) -> MDMObjective | ARObjective:
    """An objective by registry name with its settings (unknown settings are errors).

    `fast_head` picks the exact fast path of `dlmstudy.training.heads` (output head only where a loss is
    taken, chunked linear + cross-entropy); settings `chunk`, `backend`, `compiled` belong to it.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    return (FAST_OBJECTIVES if fast_head else OBJECTIVES)[name](**settings)
