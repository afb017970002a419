"""GPU-sized generation: images per second of Stable-Diffusion-sized text-to-image models.

Builds the text encoder, UNet and VAE of SD-Turbo (the SD 2.1 architecture: OpenCLIP ViT-H text
encoder, 1024 wide and 23 layers; UNet with 1024-dim cross-attention and linear projections) and of
SD 1.5 (CLIP ViT-L, 768 wide, 12 layers) from their published configurations, with random weights:
the compute does not depend on the weight values, and no weights can be downloaded here. One image
is: encode the prompt (77 tokens; with classifier-free guidance also the empty prompt), the
denoising steps (UNet on the latents, batch doubled under guidance, Euler scheduler), decode with
the VAE, and copy the uint8 pixels to the host.

On CUDA the defaults are the real thing: 512x512, float16, batches 1, 2, 4, 8, 16, PyTorch SDPA
attention; add ``--compile`` (torch.compile of the UNet and VAE decoder) and ``--channels-last``.
Goal on one H100/H200: 40 images per second or more for 1-step SD-Turbo (published: about 33 on an
A100 with ONNX Runtime at batch 4). On a CPU the defaults shrink to 128x128, float32, batches 1 and 2
and 2 steps of SD 1.5, which only shows that the code runs and what a CPU costs.

    python -m bench.gpu_generation                                # CPU: about 4 min here
    python -m bench.gpu_generation --compile --channels-last      # on a GPU machine: the goal figure
    python -m bench.gpu_generation --models sd-turbo --dtype bfloat16 --batches 1,4,16

Prints a table and writes ``bench/results/gpu_generation.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.report import LoadWatch, median, table, write_result

# The published configurations (config.json of the text_encoder, unet and vae folders), less the keys
# that only repeat diffusers' and transformers' defaults.
_UNET_COMMON = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
_CLIP_COMMON = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5}
MODELS = {
    "sd-turbo": {  # stabilityai/sd-turbo (SD 2.1 architecture, trained at 512x512)
        "unet": {
            **_UNET_COMMON,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
        },
        "text_encoder": {
            **_CLIP_COMMON,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 23,
            "projection_dim": 512,
            "hidden_act": "gelu",
        },
        "vae": _VAE,
        "steps": 1,
        "guidance_scale": 0.0,  # adversarial distillation: no classifier-free guidance
    },
    "sd15": {  # stable-diffusion-v1-5
        "unet": {**_UNET_COMMON, "cross_attention_dim": 768, "attention_head_dim": 8},
        "text_encoder": {
            **_CLIP_COMMON,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
        },
        "vae": _VAE,
        "steps": 25,
        "guidance_scale": 7.5,
    },
}
GOAL_IMAGES_PER_S = 40.0  # 1-step SD-Turbo at 512x512 on one H100/H200


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd-turbo,sd15", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels; default 512 on cuda, 128 on cpu")
    parser.add_argument("--batches", default=None, help="default 1,2,4,8,16 on cuda, 1,2 on cpu")
    parser.add_argument("--steps", default=None, help="per model, e.g. sd-turbo=1,sd15=25 (default; sd15=2 on cpu)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per batch; default 10 cuda, 2 cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and the VAE decoder")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format for UNet and VAE")
    parser.add_argument("--out", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    load = LoadWatch()
    # Idle OpenMP threads sleep rather than spin (as flows/env.py sets for the pipeline): on a CPU
    # shared with other jobs, spinning made torch 10x slower here. Read when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    size = args.size or (512 if cuda else 128)
    batches = [int(b) for b in (args.batches or ("1,2,4,8,16" if cuda else "1,2")).split(",")]
    repeat = args.repeat or (10 if cuda else 2)
    steps = {name: spec["steps"] for name, spec in MODELS.items()}
    if not cuda:
        steps["sd15"] = 2
    for item in (args.steps or "").split(","):
        if item:
            name, value = item.split("=")
            steps[name] = int(value)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    rows = []
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"--models: unknown {name!r}; known: {', '.join(MODELS)}")
        parts = build(name, device, dtype, args.channels_last, args.compile)
        for batch in batches:
            rows.append(measure(name, parts, batch, size, steps[name], repeat, device, dtype))
            rows[-1].update(compile=args.compile, channels_last=args.channels_last)
            print(table([rows[-1]]), flush=True)
        del parts
        if cuda:
            torch.cuda.empty_cache()
    print(table(rows))
    turbo = [r for r in rows if r["model"] == "sd-turbo" and r["steps"] == 1 and r["size"] == 512]
    best = max((r["images/s"] for r in turbo), default=None)
    figures = {
        "table": rows,
        "goal_images_per_s": GOAL_IMAGES_PER_S,
        "sd_turbo_1_step_512_best_images_per_s": best,
        "goal_met": None if best is None or not cuda else best >= GOAL_IMAGES_PER_S,
        "note": None if cuda else "CPU at a reduced size: not comparable with the GPU goal",
    }
    settings = {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "size": size,
        "batches": batches,
        "steps": steps,
        "repeat": repeat,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "attention": "torch scaled_dot_product_attention (diffusers AttnProcessor2_0)",
        "weights": "random, from the published configurations",
    }
    write_result("gpu_generation", argv, settings, figures, load, args.out)
    return figures


def build(name: str, device: str, dtype, channels_last: bool, compile_: bool) -> dict:
    """The text encoder, UNet, VAE and scheduler of ``name`` with random weights, on ``device``."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = MODELS[name]
    began = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: seconds instead of a minute on a CPU
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])).to(dtype)
        unet = UNet2DConditionModel(**spec["unet"]).to(dtype)
        vae = AutoencoderKL(**spec["vae"]).to(dtype)
    unet.set_attn_processor(AttnProcessor2_0())
    vae.set_attn_processor(AttnProcessor2_0())
    for model in (text_encoder, unet, vae):
        model.eval().requires_grad_(False)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    decode = vae.decode
    if compile_:
        unet = torch.compile(unet, mode="max-autotune", fullgraph=True)
        decode = torch.compile(vae.decode, mode="max-autotune")
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing"
    )
    millions = {
        n: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
        for n, m in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae))
    }
    print(f"{name}: built in {time.perf_counter() - began:.1f} s, parameters (M): {millions}", flush=True)
    return {
        "text_encoder": text_encoder,
        "unet": unet,
        "vae": vae,
        "decode": decode,
        "scheduler": scheduler,
        "spec": spec,
        "millions": millions,
    }


def generate(parts: dict, batch: int, size: int, steps: int, device: str, dtype):
    """One batch of images, end to end; returns uint8 pixels on the host (batch, H, W, 3)."""
    import torch

    spec, scheduler = parts["spec"], parts["scheduler"]
    guided = spec["guidance_scale"] > 1.0
    with torch.inference_mode():
        ids = torch.randint(0, spec["text_encoder"]["vocab_size"], (batch * (2 if guided else 1), 77), device=device)
        context = parts["text_encoder"](ids)[0]
        scheduler.set_timesteps(steps, device=device)
        latents = torch.randn(batch, 4, size // 8, size // 8, device=device, dtype=dtype) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = parts["unet"](model_input, t, encoder_hidden_states=context).sample
            if guided:
                uncond, cond = noise.chunk(2)
                noise = uncond + spec["guidance_scale"] * (cond - uncond)
            latents = scheduler.step(noise, t, latents).prev_sample
        pixels = parts["decode"](latents / spec["vae"]["scaling_factor"]).sample
        return ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def measure(name: str, parts: dict, batch: int, size: int, steps: int, repeat: int, device: str, dtype) -> dict:
    import torch

    cuda = device.startswith("cuda")
    for _ in range(3 if cuda else 1):  # warm-up: kernels, autotuning, compilation, allocator
        generate(parts, batch, size, steps, device, dtype)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeat):
        began = time.perf_counter()
        generate(parts, batch, size, steps, device, dtype)  # ends with a copy to the host: synchronised
        seconds.append(time.perf_counter() - began)
    per_batch = median(seconds)
    row = {
        "model": name,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "size": size,
        "batch": batch,
        "steps": steps,
        "cfg": parts["spec"]["guidance_scale"] > 1.0,
        "s/batch": round(per_batch, 4),
        "images/s": round(batch / per_batch, 3),
        "min s/batch": round(min(seconds), 4),
    }
    if cuda:
        row["peak GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


if __name__ == "__main__":
    main()
