"""Layout words: where an object sits and how large it is, in the words captions and prompts share.

The world writes them into its layout captions ("a small red circle at top left, fog"), the generator
learns them from those captions, prompts can ask for them (axes ``size`` and ``position`` in
``params.yaml``), and validation can check that the box it detects agrees with the words asked for.

Positions are a 3 x 3 grid of the box centre, cut at ``CENTRE_EDGES`` (about the terciles of the
world's object centres, which the renderer keeps off the borders); sizes are the box's longer side as a
share of the image, cut at ``SIZE_EDGES`` (about the terciles of the world's objects).
"""

from __future__ import annotations

CENTRE_EDGES = (0.4, 0.6)  # box centre, share of the image: left / centre / right, top / middle / bottom
SIZE_EDGES = (0.35, 0.41)  # longer box side, share of the image: small / medium / large
_ROWS, _COLUMNS = ("top", "", "bottom"), ("left", "", "right")
POSITIONS = tuple(f"{row} {column}".strip() or "center" for row in _ROWS for column in _COLUMNS)
SIZES = ("small", "medium", "large")


def _third(value: float, edges: tuple[float, float]) -> int:
    return 0 if value < edges[0] else 2 if value > edges[1] else 1


def position_word(cx: float, cy: float) -> str:
    """The grid cell of a box centre (normalised), e.g. "top left", "right", "center"."""
    return POSITIONS[3 * _third(cy, CENTRE_EDGES) + _third(cx, CENTRE_EDGES)]


def size_word(w: float, h: float) -> str:
    """ "small", "medium" or "large" for a box of normalised width and height."""
    return SIZES[_third(max(w, h), SIZE_EDGES)]


def agrees(box: tuple[float, float, float, float], position: str, size: str) -> bool:
    """Whether a normalised ``cx, cy, w, h`` box sits at ``position`` and has ``size`` ("" skips a check).

    Raises:
        ValueError: a word that is not one of ``POSITIONS`` or ``SIZES``.
    """
    if position and position not in POSITIONS:
        raise ValueError(f"position {position!r} is not one of {', '.join(POSITIONS)}")
    if size and size not in SIZES:
        raise ValueError(f"size {size!r} is not one of {', '.join(SIZES)}")
    cx, cy, w, h = box
    return (not position or position_word(cx, cy) == position) and (not size or size_word(w, h) == size)
