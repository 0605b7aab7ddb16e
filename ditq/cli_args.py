"""The ``ditq`` command line's grammar: every subcommand, option, default and help text, and the types
that read option values (a bad value is one line naming the option: see :mod:`ditq.options`). The
handlers that run the commands are in :mod:`ditq.cli`."""

from __future__ import annotations

import argparse

from ditq.fileformat import DEFAULT_OPSET, INT2_OPSET, MAX_OPSET, TARGETS
from ditq.options import (
    MAX_BATCH, MAX_CFG, MAX_COUNT, MAX_SAMPLES, MAX_RUNS, MAX_STEPS, MAX_THREADS, MAX_TRAIN_STEPS, SEED_MAX, OneLineParser, float_in, int_in,
)  # fmt: skip
from ditq.recipe import AUTO_GROUP
from ditq.runtime.samplers import METHODS


def _bits(text: str) -> int | None:
    """Activation bits: 2..8, or 16/fp/none for float activations."""
    if text.lower() in ("16", "fp", "fp16", "fp32", "none", "float"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 2..8 or 16/fp, got {text!r}") from None


def _group(text: str) -> int | None:
    if text.lower() in ("channel", "token", "none", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'channel', got {text!r}") from None


def _group_or_auto(text: str) -> int | str | None:
    return AUTO_GROUP if text.lower() == AUTO_GROUP else _group(text)


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, help="digits (shipped), a preset (dit-s-2, dit-b-2, dit-l-2, dit-xl-2; random-weight "
                   "pixart-sigma, sd3-medium), a diffusers folder or pipeline folder, or an original DiT .pt/.safetensors")
    p.add_argument("--image-size", type=int, choices=(256, 512, 1024), help="image size of a preset or an original DiT checkpoint (latents = size/8)")
    p.add_argument("--num-heads", type=int_in(1, 1024), help="attention heads of an original DiT checkpoint with a non-standard width")
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0, help="seed of a preset's random weights (default 0)")


def _wbits(text: str) -> float | int:
    if text in ("1.58", "ternary"):
        return 1.58
    try:
        return float(text) if "." in text else int(text)  # the recipe names what is out of range
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 2..8 or 1.58 (ternary), got {text!r}") from None


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="recipe JSON (overrides --wbits/--abits/--group-size/--symmetric)")
    p.add_argument("--wbits", type=_wbits, default=4, help="weight bits 2..8, or 1.58: RobuQ (ternary weights, Hadamard rotation) (default 4)")
    p.add_argument("--abits", type=_bits, default=8, help="activation bits 1..8, or 16 for float activations (default 8)")
    p.add_argument("--no-rotate", action="store_true", help="RobuQ (--wbits 1.58): no Hadamard rotation")
    p.add_argument("--mixed", action="store_true", help="RobuQ: activation bits per layer by DP on measured sensitivity, averaging --abits")
    p.add_argument("--group-size", type=_group_or_auto, default="auto",
                   help="input channels per scale, 'channel', or 'auto': 128, else the largest of 64/32/16 "
                        "that every covered layer's width takes (default auto)")  # fmt: skip
    p.add_argument("--symmetric", action="store_true", help="symmetric signed codes instead of asymmetric min-max")


def build_parser() -> argparse.ArgumentParser:
    """The ``ditq`` command line; ``command`` names the subcommand (``ditq.cli`` runs its handler)."""
    parser = OneLineParser(prog="ditq", description="Quantize Diffusion Transformers into low-bit ONNX models and run them with ONNX Runtime.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="quantize a DiT and export it to ONNX")
    _add_model_args(p, required=True)
    _add_recipe_args(p)
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier ditq export (replaced atomically)")
    _add_force_arg(p)
    p.add_argument("--target", default="qdq", choices=TARGETS, help="qdq: portable standard-ONNX QDQ graph (exact Q-DiT arithmetic); "
                   "ort: ONNX Runtime low-bit kernels (MatMulNBits, MatMulIntegerToFloat), int8 activations")
    p.add_argument("--opset", type=int_in(DEFAULT_OPSET, MAX_OPSET), help=f"ONNX opset ({DEFAULT_OPSET}..{MAX_OPSET}; default: the lowest that holds the recipe, "
                   f"{DEFAULT_OPSET}, or {INT2_OPSET} when 2-bit codes are stored as INT2/UINT2)")
    p.add_argument("--method", choices=("rtn", "gptq"), help="how integer weights are found (default: the recipe's, rtn)")
    _add_calib_args(p)

    p = sub.add_parser("validate", help="prove an exported model equal to its PyTorch reference in ONNX Runtime")
    p.add_argument("path", help="exported folder or model.onnx")
    _add_model_args(p, required=False)
    p.add_argument("--recipe", help="recipe JSON (default: the one the model carries)")
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", help="write the report as JSON to this file")

    p = sub.add_parser("recipe", help="write the recipe the options describe (to edit per layer)")
    _add_model_args(p, required=False)
    _add_recipe_args(p)
    p.add_argument("--out", help="output file (default stdout)")

    p = sub.add_parser("sample", help="generate images from an exported model with ONNX Runtime alone")
    p.add_argument("path", help="exported folder or model.onnx")
    p.add_argument("--classes", help="comma-separated class ids (default: every class)")
    p.add_argument("--per-class", type=int_in(1, MAX_COUNT), default=8,
                   help="samples per class: the grid's columns (default 8; all samples together at most 1 GiB)")
    _add_sampler_args(p)
    p.add_argument("--batch-size", type=int_in(1, MAX_BATCH), default=256, help="samples per ONNX Runtime call (doubled by guidance)")
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", required=True, help="grid.png (labelled image grid) or samples.npy (raw samples)")
    p.add_argument("--prompt", help="text-to-image models: the prompt (the images go side by side into --out .png)")
    p.add_argument("--negative-prompt", help="text-to-image models: what classifier-free guidance steers away from (default: empty)")
    p.add_argument("--guidance", type=float_in(0.0, MAX_CFG), default=None,
                   help="text-to-image models: guidance scale (default: the family's pipeline default, SD3 7, PixArt 4.5, Flux 3.5): classifier-free guidance with the negative prompt "
                        "when > 1, or the model's own guidance input (guidance-distilled Flux); flow-matching models step with Euler")
    p.add_argument("--images", type=int_in(1, MAX_COUNT), default=1, help="text-to-image models: images of the prompt (default 1)")

    p = sub.add_parser("eval", help="quantize, export and sample several configurations; FID-digits and class accuracy")
    p.add_argument("--model", default="digits", help="model to evaluate (default: the shipped digits model)")
    p.add_argument("--configs", default="fp,w8a8,w6a8,w4a8,w4a16", help="comma-separated: fp, wXaY[gN], or recipe .json files (default fp,w8a8,w6a8,w4a8,w4a16)")
    p.add_argument("--group-size", type=_group, default=64, help="group size of configs without gN (default 64)")
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--method", choices=("rtn", "gptq"), help="weight method of the quantized configs (default: rtn / the recipe file's)")
    _add_calib_args(p)
    p.add_argument("--layer-error", action="store_true", help="also report the block linears' mean relative output error on held-out inputs")
    p.add_argument("--num-samples", type=int_in(2, MAX_SAMPLES), default=500, help="samples per seed set (default 500, one class after another)")
    p.add_argument("--seeds", default="0", help="comma-separated seed sets; more than one reports the spread (default 0)")
    _add_sampler_args(p, seed=False)
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--exports", help="keep the exported models in this folder (default: a temporary one)")
    p.add_argument("--grid", help="write a PNG of the same seeds across configurations")
    p.add_argument("--inception", help="pytorch-fid Inception weights (.pth, local) for FID of non-digit models")
    p.add_argument("--real-images", help="real images for --inception: .npy [N,C,H,W] in [0,1]")
    p.add_argument("--json", help="write the report as JSON")

    p = sub.add_parser("sensitivity", help="per-layer sensitivity: the output error with one block unit quantized at a time, per group size")
    p.add_argument("--model", default="digits", help="model to measure (default: the shipped digits model)")
    p.add_argument("--wbits", type=int_in(2, 8), default=4, help="weight bits 2..8 (default 4)")
    p.add_argument("--abits", type=_bits, default=4, help="activation bits 2..8, or 16 for float activations (default 4)")
    p.add_argument("--group-sizes", default="32,64,128", help="comma-separated group sizes to compare (default 32,64,128)")
    p.add_argument("--symmetric", action="store_true", help="symmetric signed codes instead of asymmetric min-max")
    p.add_argument("--json", help="write the table and the per-stream summary as JSON")

    p = sub.add_parser("search", help="evolutionary search of per-layer group sizes (Q-DiT), resumable")
    p.add_argument("--model", default="digits", help="model to search on (default digits; fitness is FID-digits)")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--abits", type=int, default=8)
    p.add_argument("--group-size", type=_group, default=64, help="group size of the layers not searched (default 64)")
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--space", default="32,64,128,192,288", help="candidate group sizes (default Q-DiT's 32,64,128,192,288)")
    p.add_argument("--budget", default="g128", help="cost ceiling: gN = uniform group N by the cost model (default g128)")
    p.add_argument("--population", type=int_in(1, 10_000), default=50)
    p.add_argument("--generations", type=int_in(1, 10_000), default=10)
    p.add_argument("--top-k", type=int_in(1, 10_000), default=10)
    p.add_argument("--crossovers", type=int_in(0, 10_000), default=25)
    p.add_argument("--mutations", type=int_in(0, 10_000), default=25)
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0)
    _add_fitness_args(p)
    p.add_argument("--method", choices=("rtn", "gptq"), default="gptq", help="method written into the recipe (default gptq)")
    p.add_argument("--journal", required=True, help="JSON-lines log of every evaluation; rerun to resume")
    p.add_argument("--out", required=True, help="the best recipe (JSON)")

    p = sub.add_parser("fitness", help="the search's fitness of whole configurations on several seed sets (exit 1 if rankings differ)")
    p.add_argument("--model", default="digits")
    p.add_argument("--configs", required=True, help="comma-separated wXaY[gN] or recipe .json files")
    p.add_argument("--group-size", type=_group, default=64)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--seeds", default="1,2,3", help="seed sets (default 1,2,3)")
    _add_fitness_args(p)
    p.add_argument("--json", help="write the table as JSON")

    p = sub.add_parser("bench", help="latency, size, peak RSS and error of quantized exports vs float ONNX Runtime")
    p.add_argument("--model", default="digits", help="built-in model, preset (dit-xl-2, ...) or path (default digits)")
    p.add_argument("--image-size", type=int, choices=(256, 512, 1024), help="presets: image size (latents of size/8)")
    p.add_argument("--variants", default="float,ort-int8,ort-int4,w8a8,w4a8,w4a8@qdq",
                   help="float, ort-int8 (quantize_dynamic), ort-int4 (MatMulNBitsQuantizer), or eval's configurations "
                        "(wXaY[gN], w1.58aY[h], recipe .json), target ort unless @qdq "
                        "(default: float,ort-int8,ort-int4,w8a8,w4a8,w4a8@qdq)")  # fmt: skip
    p.add_argument("--group-size", type=_group_or_auto, default="auto",
                   help="group size of wXaY variants (gN: of their weight+activation block linears only), or "
                        "'auto': 128, else the largest of 64/32/16 the model's widths take (default auto)")  # fmt: skip
    p.add_argument("--batch", type=int_in(1, MAX_BATCH), default=1, help="batch of one denoising step (default 1)")
    p.add_argument("--runs", type=int_in(1, MAX_RUNS), default=10, help="timed runs per variant, interleaved (default 10)")
    p.add_argument("--threads", type=int_in(1, MAX_THREADS), help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quality", type=int_in(0, MAX_SAMPLES), default=0, metavar="N", help="digits: also sample N images per variant for FID-digits and class accuracy")
    p.add_argument("--steps", type=int_in(1, MAX_STEPS), default=50, help="DDIM steps of --quality sampling (default 50)")
    p.add_argument("--profile", action="store_true", help="also profile each variant: share of kernel time per op type")
    p.add_argument("--keep", help="build the variants in this folder and keep them (default: a temporary folder)")
    p.add_argument("--check", action="store_true", help="exit 1 unless the ort target's speed/size/memory goals hold")
    p.add_argument("--json", help="write {rows: [{variant, latency_ratio, size_ratio, rss_ratio, rel_error, ...}]}")

    p = sub.add_parser("qat", help="RobuQ quantization-aware training of the digits DiT (ternary weights, rotated low-bit activations)")
    p.add_argument("--model", default="digits", help="a digits model (the training data are scikit-learn's digits)")
    p.add_argument("--abits", type=int, default=4, choices=range(1, 9), metavar="{1..8}", help="activation bits of the block linears (average with --mixed)")
    p.add_argument("--no-rotate", action="store_true", help="no Hadamard rotation")
    p.add_argument("--mixed", action="store_true", help="allocate activation bits per layer (DP on measured sensitivity), averaging --abits")
    p.add_argument("--steps", type=int_in(1, MAX_TRAIN_STEPS), default=1000, help="training steps (default 1000, about 7 min alone on 2 CPU cores)")
    p.add_argument("--batch-size", type=int_in(1, MAX_BATCH), default=128)
    p.add_argument("--lr", type=float_in(0.0, 1.0, open_lo=True), default=2e-4)
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0)
    p.add_argument("--checkpoint", help="resumable checkpoint file")
    p.add_argument("--out", required=True, help="output diffusers folder (weights + recipe.json): new, empty, or an earlier ditq output")
    _add_force_arg(p)

    p = sub.add_parser("train-digits", help="train the digit judge and the shipped digits DiT from scratch (CPU)")
    p.add_argument("--steps", type=int_in(1, MAX_TRAIN_STEPS), default=6000, help="training steps of batch 128 (default 6000)")
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0)
    p.add_argument("--out", help="output diffusers folder (default: the shipped ditq/assets/digits)")
    p.add_argument("--checkpoint", help="resumable training checkpoint file (written every 500 steps)")
    p.add_argument("--judge-only", action="store_true", help="train only the judge (seconds)")
    _add_force_arg(p)

    p = sub.add_parser("train-digits-t2i", help="train the text-conditioned digits-t2i MMDiT and its text encoder from scratch (CPU)")
    p.add_argument("--steps", type=int_in(1, MAX_TRAIN_STEPS), default=3000, help="training steps of batch 64 (default 3000)")
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0, help="seed of the weights, data order, prompts and noise")
    p.add_argument("--threads", type=int_in(1, 256), default=1, help="torch threads (default 1: the same result everywhere)")
    p.add_argument("--out", help="output pipeline folder (default: the shipped ditq/assets/digits-t2i)")
    p.add_argument("--checkpoint", help="resumable training checkpoint file (written every 200 steps)")
    _add_force_arg(p)
    return parser


def _add_force_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="also replace a ditq output that changed since ditq wrote it "
                   "(never a folder ditq did not write, nor the input model)")  # fmt: skip


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-samples", type=int_in(1, MAX_SAMPLES), default=64, help="GPTQ: sampling trajectories to record inputs from (default 64)")
    p.add_argument("--calib-timesteps", type=int_in(1, MAX_STEPS), default=10, help="GPTQ: timesteps recorded per trajectory (default 10)")
    p.add_argument("--calib-cache", default=".ditq-cache", help="GPTQ: folder caching calibration inputs (default .ditq-cache)")


def _add_fitness_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-samples", type=int_in(1, MAX_SAMPLES), default=250, help="samples per fitness evaluation (default 250)")
    p.add_argument("--fitness-steps", type=int_in(1, MAX_STEPS), default=25, help="sampling steps per fitness evaluation: DDIM, or a flow-matching model's Euler steps (default 25)")
    p.add_argument("--rmse-weight", type=float_in(0.0, 1e6), default=20.0, help="fitness = FID-digits + this x RMSE vs float samples")
    p.add_argument("--workers", type=int_in(1, 256), default=2, help="parallel evaluation processes (default 2)")


def _add_sampler_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    p.add_argument("--steps", type=int_in(1, MAX_STEPS), default=50, help="denoising steps (default 50)")
    p.add_argument("--cfg", type=float_in(0.0, MAX_CFG), default=1.5, help="classifier-free guidance scale; 1 = none (default 1.5)")
    p.add_argument("--sampler", default=None, choices=METHODS,
                   help="ddim (deterministic), ddpm, or dpm++2m (DPM-Solver++(2M), deterministic); default: the one the model's "
                        "scheduler config asks for (dpm++2m for a DPMSolverMultistepScheduler config ditq implements), else ddim")  # fmt: skip
    if seed:
        p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0, help="seed of the starting noise (default 0)")
