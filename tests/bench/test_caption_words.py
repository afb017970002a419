"""bench.caption_words: prompt pairs that differ in one word, and the figures on a tiny real pipeline."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from bench.caption_words import main, word_swaps
from tasks.tiny_models import build_tiny_pipeline
from tasks.world import CLASSES, COLOURS, CONDITIONS


def test_each_pair_differs_in_the_swapped_word_only() -> None:
    swaps = word_swaps(list(CLASSES), list(COLOURS), list(CONDITIONS))
    assert [len(swaps[w]) for w in ("class", "colour", "condition")] == [6, 15, 10]  # every pair of values
    for word, values in (("class", CLASSES), ("colour", COLOURS), ("condition", CONDITIONS)):
        for first, second in swaps[word]:
            a, b = first.replace(",", " ,").split(), second.replace(",", " ,").split()
            differ = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
            assert len(differ) == 1 and set(differ[0]) <= set(values), (first, second)


def test_reports_each_words_pull_on_a_real_pipeline(tmp_path: Path) -> None:
    vocabulary = [*CLASSES, *COLOURS, *CONDITIONS, "a", ","]
    pipe = build_tiny_pipeline(tmp_path / "pipe", vocabulary=vocabulary, seed=0)
    grid = tmp_path / "grid.png"
    figures = main(["--generator", str(pipe), "--out", str(tmp_path / "words.json"), "--grid", str(grid)])
    rows = {row["word swapped"]: row for row in figures["rows"]}
    assert set(rows) == {"class", "colour", "condition"}
    for row in rows.values():  # random weights still hear every word: nothing is zero
        assert row["text distance"] > 0 and all(row[f"UNet change t={t}"] > 0 for t in (900, 500, 200))
    with Image.open(grid) as image:
        assert image.size == (8 * 64 * 2, len(CLASSES) * 64 * 2)  # a column per seed, a row per class, at 2x
    assert json.loads((tmp_path / "words.json").read_text())["figures"]["rows"] == figures["rows"]
