"""Does the generator hear every word of its prompt? How far one swapped word moves its text encoder and UNet.

For prompts "a {colour} {class}, {condition}", swaps one word at a time (the class, the colour or the
condition) and measures how far that moves
- the text encoder's output (the hidden states the UNet attends to; L2 over all tokens), and
- the UNet's noise prediction on the same noisy latent, relative to its size, at three noise levels.

A word whose swap barely moves the UNet cannot steer the image, whatever the guidance scale. This found
that the shipped generator's jointly trained text encoder had drawn the shape words together (circle
next to square, triangle next to star) while the colour words moved apart (docs/generator.md).

    python -m bench.caption_words                          # seconds
    python -m bench.caption_words --generator DIR
    python -m bench.caption_words --grid docs/generator-class-words.png   # also draws it (about 20 s)

Prints a table and writes ``bench/results/caption_words.json``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

from bench.report import ROOT, LoadWatch, table, write_result
from bench.workload import prepare_environment

TIMESTEPS = (900, 500, 200)


def word_swaps(classes, colours, conditions) -> dict[str, list[tuple[str, str]]]:
    """Per swapped word, pairs of prompts that differ in that word only."""

    def prompt(cls: str, colour: str, condition: str) -> str:
        return f"a {colour} {cls}, {condition}"

    base_colour, base_condition, base_class = colours[0], conditions[0], classes[0]
    return {
        "class": [(prompt(a, base_colour, base_condition), prompt(b, base_colour, base_condition))
                  for a, b in itertools.combinations(classes, 2)],
        "colour": [(prompt(base_class, a, base_condition), prompt(base_class, b, base_condition))
                   for a, b in itertools.combinations(colours, 2)],
        "condition": [(prompt(base_class, base_colour, a), prompt(base_class, base_colour, b))
                      for a, b in itertools.combinations(conditions, 2)],
    }  # fmt: skip


def draw_grid(pipe, classes: list[str], colours: list[str], out: Path, columns: int = 8) -> None:
    """Rows: "a {colour} {class}, plain" per class; column j: colour j in turn and starting noise j for every row."""
    import numpy as np
    import torch
    from PIL import Image

    pipe.set_progress_bar_config(disable=True)
    rows = []
    for cls in classes:
        prompts = [f"a {colours[j % len(colours)]} {cls}, plain" for j in range(columns)]
        seeds = [torch.Generator().manual_seed(j) for j in range(columns)]
        images = pipe(prompts, num_inference_steps=20, guidance_scale=10.0, height=64, width=64, generator=seeds,
                      output_type="np").images  # fmt: skip
        rows.append(np.concatenate(list(images), axis=1))
    grid = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST).save(out)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", type=Path, default=ROOT / "models" / "generator")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noisy latents")
    parser.add_argument("--grid", type=Path, default=None,
                        help="also draw a PNG: one row per class, one column per seed, every image of a column "
                        "from the same starting noise, so only the class word differs down a column")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/caption_words.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    load = LoadWatch()
    prepare_environment(Path(tempfile.mkdtemp(prefix="synthdet-bench-words-")))

    import torch
    from diffusers import StableDiffusionPipeline

    from tasks.world import CLASSES, COLOURS, CONDITIONS

    pipe = StableDiffusionPipeline.from_pretrained(args.generator, dtype=torch.float32, local_files_only=True)
    tokenizer, encoder, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    size, channels = unet.config.sample_size, unet.config.in_channels
    latent = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(args.seed))

    def encode(prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        return encoder(ids.input_ids)[0]

    rows = []
    with torch.inference_mode():
        for word, pairs in word_swaps(list(CLASSES), list(COLOURS), list(CONDITIONS)).items():
            first, second = encode([a for a, _ in pairs]), encode([b for _, b in pairs])
            row = {"word swapped": word, "pairs": len(pairs),
                   "text distance": round(float((first - second).flatten(1).norm(dim=1).mean()), 2)}  # fmt: skip
            for t in TIMESTEPS:
                steps = torch.full((len(pairs),), t)
                noisy = latent.expand(len(pairs), -1, -1, -1)
                one, two = unet(noisy, steps, first).sample, unet(noisy, steps, second).sample
                change = (one - two).flatten(1).norm(dim=1) / one.flatten(1).norm(dim=1)
                row[f"UNet change t={t}"] = round(float(change.mean()), 4)
            rows.append(row)
    print(table(rows))
    if args.grid:
        draw_grid(pipe, list(CLASSES), list(COLOURS), args.grid)
    write_result("caption_words", argv, {"generator": str(args.generator), "seed": args.seed}, {"rows": rows}, load,
                 args.out)  # fmt: skip
    return {"rows": rows}


if __name__ == "__main__":
    main()
