"""Which arms a study compares: the spec's `comparisons` (pairs of a diffusion arm and an AR arm, checked at load),
or by default every diffusion arm against every AR arm. An arm added to `arms:` joins the default pairs; it
never silently replaces one."""

from __future__ import annotations

from dlmstudy.models.registry import ARMS

DIFFUSION, AR = "mdm", "ar"


def arm_objective(name: str, known: dict[str, str] | None = None) -> str | None:
    """An arm's objective kind ("mdm" or "ar"): from the arm registry, else from `known` (e.g. the runs' records)."""
    arm = ARMS.get(name)
    return arm.objective if arm is not None else (known or {}).get(name)


def check_comparisons(arms: list[str], pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The spec's pairs ordered (diffusion arm, AR arm); ValueError naming the first pair that is not two arms of
    `arms:` with one diffusion and one AR objective, or that is listed twice."""
    out: list[tuple[str, str]] = []
    for first, second in pairs:
        absent = [name for name in (first, second) if name not in arms]
        if absent:
            raise ValueError(f"[{first}, {second}] names {', '.join(absent)}, not in arms: {', '.join(arms)}")
        kinds = {name: arm_objective(name) for name in (first, second)}
        unknown = [name for name, kind in kinds.items() if kind is None]
        if unknown:
            raise ValueError(f"[{first}, {second}]: unknown arm {unknown[0]!r} (docs/arms.md lists the arms)")
        if sorted(kinds.values()) != [AR, DIFFUSION]:
            raise ValueError(f"[{first}, {second}] must pair a diffusion arm with an AR arm (objectives "
                             f"{kinds[first]} and {kinds[second]})")
        pair = (first, second) if kinds[first] == DIFFUSION else (second, first)
        if pair in out:
            raise ValueError(f"[{first}, {second}] is listed twice")
        out.append(pair)
    return out


def default_comparisons(arms: list[str], known: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Every diffusion arm of `arms` against every AR arm, in the order of `arms` (objectives from the registry,
    else `known`)."""
    kinds = {name: arm_objective(name, known) for name in arms}
    return [(d, a) for d in arms if kinds[d] == DIFFUSION for a in arms if kinds[a] == AR]
