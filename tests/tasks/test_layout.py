"""Layout words: the grid cell of a box centre and the size bin of its longer side."""

import pytest

from tasks.layout import POSITIONS, SIZES, agrees, position_word, size_word


def test_positions_cover_a_three_by_three_grid() -> None:
    assert len(set(POSITIONS)) == 9
    assert position_word(0.2, 0.2) == "top left"
    assert position_word(0.5, 0.2) == "top"
    assert position_word(0.8, 0.5) == "right"
    assert position_word(0.5, 0.5) == "center"
    assert position_word(0.5, 0.9) == "bottom"
    assert position_word(0.9, 0.9) == "bottom right"


def test_size_is_the_longer_side() -> None:
    assert size_word(0.30, 0.20) == "small"
    assert size_word(0.20, 0.38) == "medium"
    assert size_word(0.45, 0.10) == "large"
    assert SIZES == ("small", "medium", "large")


def test_agrees_checks_only_the_words_given() -> None:
    box = (0.2, 0.8, 0.45, 0.40)  # bottom left, large
    assert agrees(box, "bottom left", "large")
    assert not agrees(box, "top left", "large")
    assert not agrees(box, "bottom left", "small")
    assert agrees(box, "", "large") and agrees(box, "bottom left", "") and agrees(box, "", "")


def test_unknown_words_are_named() -> None:
    with pytest.raises(ValueError, match="'upper left' is not one of"):
        agrees((0.5, 0.5, 0.3, 0.3), "upper left", "")
    with pytest.raises(ValueError, match="'huge' is not one of"):
        agrees((0.5, 0.5, 0.3, 0.3), "", "huge")
