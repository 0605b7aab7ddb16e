"""``ditq`` command line: a thin layer over the Python API.

Exit codes: 0 success / validation passed, 1 validation failed, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ditq.errors import DitqError


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


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, help="preset (dit-s-2, dit-b-2, dit-l-2, dit-xl-2), diffusers folder, or original DiT .pt/.safetensors")
    p.add_argument("--image-size", type=int, choices=(256, 512), help="image size of an original DiT checkpoint (latents = size/8)")
    p.add_argument("--num-heads", type=int, help="attention heads of an original DiT checkpoint with a non-standard width")
    p.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights (default 0)")


def _recipe_from_args(args):
    from ditq.recipe import Recipe

    if args.recipe:
        return Recipe.load(args.recipe)
    return Recipe.qdit(args.wbits, args.abits, args.group_size, args.symmetric)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="recipe JSON (overrides --wbits/--abits/--group-size/--symmetric)")
    p.add_argument("--wbits", type=int, default=4, help="weight bits 2..8 (default 4)")
    p.add_argument("--abits", type=_bits, default=8, help="activation bits 2..8, or 16 for float activations (default 8)")
    p.add_argument("--group-size", type=_group, default=128, help="input channels per scale, or 'channel' (default 128)")
    p.add_argument("--symmetric", action="store_true", help="symmetric signed codes instead of asymmetric min-max")


def cmd_export(args) -> int:
    from ditq.exporter.export import export
    from ditq.exporter.reference import quantize_model
    from ditq.models import load_model

    recipe = _recipe_from_args(args)
    loaded = load_model(args.model, image_size=args.image_size, seed=args.seed, num_heads=args.num_heads)
    qdit = quantize_model(loaded.model, recipe, progress=not args.quiet)
    res = export(qdit, args.out, source=loaded.source, target=args.target, opset=args.opset, progress=not args.quiet)
    print(f"wrote {res.model_path} ({res.file_bytes / 1e6:.2f} MB, {res.layers} quantized weights, "
          f"{res.activation_subgraphs} activation quantizers) in {res.seconds:.1f} s")  # fmt: skip
    return 0


def cmd_validate(args) -> int:
    from ditq.runtime.validate import validate

    report = validate(
        args.path, model_spec=args.model, recipe_path=args.recipe, image_size=args.image_size,
        provider=args.provider, progress=not args.quiet,
    )  # fmt: skip
    print(report.table())
    if args.json:
        _write_json(Path(args.json), report.to_dict())
    return 0 if report.passed else 1


def cmd_recipe(args) -> int:
    recipe = _recipe_from_args(args)
    if args.model:
        from ditq.models import load_model

        plans = recipe.resolve(load_model(args.model, image_size=args.image_size, seed=args.seed, num_heads=args.num_heads).model)
        print(f"{len(plans)} covered layers", file=sys.stderr)
    text = recipe.to_json() + "\n"
    if args.out:
        _write_text(Path(args.out), text)
    else:
        sys.stdout.write(text)
    return 0


def _write_text(path: Path, text: str) -> None:
    """Write atomically: a temporary sibling renamed over the final name."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(obj, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    from ditq.exporter.export import DEFAULT_OPSET, TARGETS

    parser = argparse.ArgumentParser(prog="ditq", description="Quantize Diffusion Transformers into low-bit ONNX models and run them with ONNX Runtime.")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="quantize a DiT and export it to ONNX")
    _add_model_args(p, required=True)
    _add_recipe_args(p)
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--target", default="qdq", choices=TARGETS, help="qdq: portable standard-ONNX QDQ graph")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= 21, default {DEFAULT_OPSET})")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("validate", help="prove an exported model equal to its PyTorch reference in ONNX Runtime")
    p.add_argument("path", help="exported folder or model.onnx")
    _add_model_args(p, required=False)
    p.add_argument("--recipe", help="recipe JSON (default: the one the model carries)")
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", help="write the report as JSON to this file")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("recipe", help="write the recipe the options describe (to edit per layer)")
    _add_model_args(p, required=False)
    _add_recipe_args(p)
    p.add_argument("--out", help="output file (default stdout)")
    p.set_defaults(func=cmd_recipe)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DitqError as e:
        print(f"ditq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ditq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
