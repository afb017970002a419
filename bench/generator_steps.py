"""What does one training step of the default generator cost here, and what does a config add up to?

Times a few optimiser steps of the autoencoder and of the UNet (+ text encoder) for the sizes in
``params.yaml`` (section train-generator) and for alternatives, then projects the full training time.
Use it to size the generator to its 45-minute budget on a 2-core CPU. Run it on a quiet machine:
a second job on 2 cores slows torch by far more than 2x.

    python -m bench.generator_steps               # about 2 min
    python -m bench.generator_steps --threads 1

Prints a table and writes ``bench/results/generator_steps.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ALTERNATIVES = [  # (vae_channels, vae_batch, unet_channels, unet_batch)
    ([32, 64, 64], 32, [48, 96, 96], 64),
    ([16, 32, 64], 32, [32, 64, 64], 64),
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=6, help="timed steps per part; the first is dropped")
    parser.add_argument("--out", type=Path, default=RESULTS / "generator_steps.json")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    import torch

    from tasks.config import load_params

    torch.set_num_threads(args.threads)
    cfg = load_params(args.params).train_generator
    configs = [(cfg.vae_channels, cfg.vae_batch, cfg.unet_channels, cfg.unet_batch), *ALTERNATIVES]
    rows = []
    for vae_channels, vae_batch, unet_channels, unet_batch in configs:
        trial = cfg.model_copy(
            update={"vae_channels": vae_channels, "vae_batch": vae_batch, "unet_channels": unet_channels, "unet_batch": unet_batch}
        )  # fmt: skip
        vae_s, unet_s, unet_params = _time_steps(trial, args.steps)
        projected = vae_s * cfg.vae_steps + unet_s * cfg.unet_steps
        rows.append({
            "vae_channels": vae_channels, "vae_batch": vae_batch, "vae_s_per_step": round(vae_s, 3),
            "unet_channels": unet_channels, "unet_batch": unet_batch, "unet_s_per_step": round(unet_s, 3),
            "unet_million_params": round(unet_params / 1e6, 2),
            "projected_minutes_at_params_steps": round(projected / 60, 1),
        })  # fmt: skip
        print(
            f"vae {vae_channels} b{vae_batch}: {vae_s:.3f} s/step | unet {unet_channels} b{unet_batch} "
            f"({unet_params / 1e6:.2f}M): {unet_s:.3f} s/step | {cfg.vae_steps} + {cfg.unet_steps} steps: "
            f"{projected / 60:.1f} min",
            flush=True,
        )
    result = {
        "command": "python -m bench.generator_steps " + " ".join(argv),
        "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
        "params_steps": {"vae_steps": cfg.vae_steps, "unet_steps": cfg.unet_steps},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


def _time_steps(cfg, steps: int) -> tuple[float, float, int]:
    """Median seconds per optimiser step of the autoencoder and of the UNet with the text encoder."""
    import statistics

    import torch
    import torch.nn.functional as F

    from tasks.train_generator import _edges, build_parts
    from tasks.world import CLASSES, COLOURS, CONDITIONS

    words = ["a", "and", ",", *CLASSES, *COLOURS, *CONDITIONS]
    vae, _, text_encoder, unet, _ = build_parts(cfg, words)
    x = torch.rand(cfg.vae_batch, 3, cfg.image_size, cfg.image_size) * 2 - 1
    optimizer = torch.optim.AdamW(vae.parameters())
    vae_times = []
    for _ in range(steps):
        began = time.perf_counter()
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(rec, x) + F.l1_loss(_edges(rec), _edges(x)) + 1e-7 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        vae_times.append(time.perf_counter() - began)
    side = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    unet.to(memory_format=torch.channels_last)  # as tasks/train_generator.py trains it
    z = torch.randn(cfg.unet_batch, cfg.latent_channels, side, side).contiguous(memory_format=torch.channels_last)
    ids = torch.randint(0, len(words), (cfg.unet_batch, cfg.max_tokens))
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params)
    unet_times = []
    for _ in range(steps):
        began = time.perf_counter()
        t = torch.randint(0, 1000, (cfg.unet_batch,))
        loss = F.mse_loss(unet(z, t, text_encoder(ids)[0]).sample, z)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        unet_times.append(time.perf_counter() - began)
    n_params = sum(p.numel() for p in unet.parameters())
    return statistics.median(vae_times[1:]), statistics.median(unet_times[1:]), n_params


if __name__ == "__main__":
    main()
