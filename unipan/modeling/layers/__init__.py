"""Building blocks shared by the parts: input checks, losses (`losses.py`), deformable conv."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["require_features"]


def require_features(shapes: Mapping[str, tuple[int, int]], names: Sequence[str], who: str) -> list[tuple[int, int]]:
    """Check that a part's input features exist among the backbone's outputs.

    Every part that reads backbone features calls this when it is built, so a wrong level name
    fails at construction with the available names, not with a KeyError in the first forward.

    Args:
        shapes: {feature name: (channels, stride)} of the backbone (`output_shape()`).
        names: the feature names the part reads.
        who: the part, as it should appear in the error ("semantic head", "RPN", ...).

    Returns:
        [(channels, stride)] of `names`, in their order.

    Raises:
        ValueError: naming `who`, the missing names and the available ones.
    """
    if not names:
        raise ValueError(f"{who} needs at least one input feature")
    missing = [name for name in names if name not in shapes]
    if missing:
        raise ValueError(f"{who} inputs {missing} not among backbone outputs {sorted(shapes)}")
    return [shapes[name] for name in names]
