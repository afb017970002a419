"""The champion promotion rule."""

from tasks.finetune import promotion_decision


def test_first_model_becomes_champion() -> None:
    assert promotion_decision(0.3, None, 0.05) == (True, "first model: mAP50-95 0.3000 becomes champion")


def test_a_challenger_must_beat_the_champion_by_the_margin() -> None:
    assert promotion_decision(0.56, 0.50, 0.05)[0] is True
    assert promotion_decision(0.55, 0.50, 0.05)[0] is True
    promoted, reason = promotion_decision(0.54, 0.50, 0.05)
    assert promoted is False and "champion kept" in reason and "0.5400" in reason
    assert promotion_decision(0.40, 0.50, 0.0)[0] is False
