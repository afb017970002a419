"""A picture: real rare-condition images beside common images recoloured to that condition and generated ones.

One row per rare condition: ``--per`` real held-out images, then as many common images recoloured to the
condition's colours (``dataset.restyle``, as the experiment made them: ``<workspace>/cache/restyled/``),
then as many of the experiment's generated images of that condition.

    python -m bench.restyle_look --workspace W --experiment restyle    # writes docs/restyle-look.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.report import ROOT


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--experiment", required=True, help="an experiment run with dataset.restyle set")
    parser.add_argument("--tests", type=Path, default=ROOT / "data" / "world" / "test")
    parser.add_argument("--conditions", default="fog,night,rain,noise")
    parser.add_argument("--per", type=int, default=3, help="images of each kind per row")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "restyle-look.png")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    import pandas as pd

    from tasks.grids import image_grid

    table = args.workspace / "experiments" / args.experiment / "synthetic.parquet"
    if not table.is_file():
        raise SystemExit(f"--experiment: {table}: no such file (run `synthdet experiment` first)")
    generated = pd.read_parquet(table)
    generated = generated[generated["status"] == "ok"]
    paths, captions = [], []
    for condition in args.conditions.split(","):
        recoloured = sorted((args.workspace / "cache" / "restyled" / condition).glob("*.png"))
        if not recoloured:
            raise SystemExit(f"--workspace: no recoloured {condition} images under cache/restyled/")
        kinds = [
            ("real", sorted((args.tests / condition / "images").glob("*.png"))),
            ("common, recoloured", recoloured),
            ("generated", list(generated.loc[generated["condition"] == condition, "path"])),
        ]
        for kind, files in kinds:
            paths += files[: args.per]
            captions += [f"{condition}: {kind}"] * len(files[: args.per])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(paths, captions, thumb=96, columns=3 * args.per, caption_lines=2).save(args.out)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
