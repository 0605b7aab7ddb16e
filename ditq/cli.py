"""``ditq`` command line: a thin layer over the Python API.

Exit codes: 0 success / validation passed, 1 validation failed, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ditq.errors import DitqError
from ditq.options import (
    MAX_BATCH, MAX_CFG, MAX_COUNT, MAX_SAMPLES, MAX_STEPS, SEED_MAX, OneLineParser, float_in, int_in, int_list,
)  # fmt: skip


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
    from ditq.recipe import AUTO_GROUP

    return AUTO_GROUP if text.lower() == AUTO_GROUP else _group(text)


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, help="digits (shipped), a preset (dit-s-2, dit-b-2, dit-l-2, dit-xl-2), a diffusers folder, or an original DiT .pt/.safetensors")
    p.add_argument("--image-size", type=int, choices=(256, 512), help="image size of an original DiT checkpoint (latents = size/8)")
    p.add_argument("--num-heads", type=int_in(1, 1024), help="attention heads of an original DiT checkpoint with a non-standard width")
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0, help="seed of a preset's random weights (default 0)")


def _recipe_from_args(args, loaded=None):
    """The recipe the flags describe; the ``LoadedModel`` (loaded when needed and not given) resolves
    ``--group-size auto`` and ``--mixed``. Without a model (``ditq recipe`` alone) auto means 128."""
    from ditq.recipe import AUTO_GROUP, AUTO_GROUP_CANDIDATES, Recipe, auto_group_size

    if args.recipe:
        return Recipe.load(args.recipe)
    if args.wbits == 1.58:
        if args.abits is None:
            raise DitqError("ternary weights (--wbits 1.58) take RobuQ's coverage and need --abits 1..8")
        return _robuq_recipe(args, loaded)
    if args.mixed or args.no_rotate:
        raise DitqError("--mixed and --no-rotate apply to ternary weights (--wbits 1.58)")

    def qdit(group_size):
        return Recipe.qdit(args.wbits, args.abits, group_size, args.symmetric)

    if args.group_size != AUTO_GROUP:
        return qdit(args.group_size)
    if loaded is None and not getattr(args, "model", None):
        return qdit(AUTO_GROUP_CANDIDATES[0])
    return qdit(auto_group_size((loaded or _loaded_of(args)).model, qdit))


def _loaded_of(args):
    from ditq.models import load_model

    return load_model(args.model, image_size=getattr(args, "image_size", None), seed=getattr(args, "seed", 0),
                      num_heads=getattr(args, "num_heads", None))  # fmt: skip


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


def cmd_export(args) -> int:
    from ditq.exporter.export import export
    from ditq.exporter.reference import quantize_model
    from ditq.files import check_out_dir
    from ditq.models import load_model, source_paths

    loaded = load_model(args.model, image_size=args.image_size, seed=args.seed, num_heads=args.num_heads)
    check_out_dir(args.out, protect=source_paths(loaded.source), force=args.force)  # likewise a bad --out
    recipe = _recipe_from_args(args, loaded)
    if args.method:
        from dataclasses import replace

        recipe = replace(recipe, method=args.method)
    calibration = _calibration(args, loaded, recipe) if recipe.method == "gptq" else None
    qdit = quantize_model(loaded.model, recipe, progress=not args.quiet, calibration=calibration, target=args.target)
    res = export(qdit, args.out, source=loaded.source, pipeline=loaded.pipeline, opset=args.opset, progress=not args.quiet,
                 force=args.force)  # fmt: skip
    kernels = f", {res.kernels} layers on ONNX Runtime kernels" if res.kernels else ""
    print(f"wrote {res.model_path} ({res.file_bytes / 1e6:.2f} MB, {res.layers} quantized weights, "
          f"{res.activation_quantizers} activation quantizers{kernels}) in {res.seconds:.1f} s")  # fmt: skip
    return 0


def _calibration(args, loaded, recipe):
    """Calibration inputs of every covered linear for GPTQ, recorded along float sampling trajectories
    and cached (by model and settings) in ``--calib-cache``."""
    import hashlib
    from dataclasses import asdict

    from ditq.calib.calibration import CalibConfig, load_or_record, sampling_key

    cfg = CalibConfig(num_samples=args.calib_samples, timesteps_per_sample=args.calib_timesteps)
    linears = [n for n, p in recipe.resolve(loaded.model).items() if p.kind == "linear"]
    digest = hashlib.sha256(json.dumps(loaded.source, sort_keys=True).encode()).hexdigest()[:16]
    clip = bool(loaded.pipeline.get("clip_denoised"))
    settings = json.dumps(asdict(cfg), sort_keys=True) + sampling_key(loaded.schedule, clip)
    key = hashlib.sha256(settings.encode()).hexdigest()[:8]
    cache = Path(args.calib_cache) / f"calib-{digest}-{key}.safetensors"
    return load_or_record(cache, loaded.model, linears, cfg, model_digest=digest, schedule=loaded.schedule,
                          clip_denoised=clip, progress=not args.quiet)  # fmt: skip


def cmd_validate(args) -> int:
    from ditq.workflows.validate import validate

    report = validate(
        args.path, model_spec=args.model, recipe_path=args.recipe, image_size=args.image_size,
        provider=args.provider, progress=not args.quiet,
    )  # fmt: skip
    print(report.table())
    if args.json:
        _write_json(Path(args.json), report.to_dict())
    return 0 if report.passed else 1


def cmd_recipe(args) -> int:
    loaded = _loaded_of(args) if args.model else None
    recipe = _recipe_from_args(args, loaded)
    if loaded is not None:
        print(f"{len(recipe.resolve(loaded.model))} covered layers", file=sys.stderr)
    text = recipe.to_json() + "\n"
    if args.out:
        _write_text(Path(args.out), text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_sample(args) -> int:
    import time

    import numpy as np

    from ditq.runtime.generate import ExportedDiT, parse_classes

    t0 = time.perf_counter()
    model = ExportedDiT.open(args.path, provider=args.provider)
    classes = parse_classes(args.classes, model.num_classes)
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npy"):
        raise DitqError(f"--out {out}: expected a .png grid or a .npy array of samples")
    if out.suffix.lower() == ".png" and model.pipeline.get("space") != "pixel" and not model.has_decoder:
        raise DitqError(f"{model.path} samples latents and carries no VAE decoder: write them with --out FILE.npy")
    model.check_count(len(classes) * args.per_class)  # before any work: the samples must fit the memory budget
    if out.suffix.lower() == ".png":
        from ditq.runtime.images import check_grid_size

        check_grid_size(len(classes), args.per_class)
    labels = np.repeat(np.asarray(classes, np.int64), args.per_class)
    x = model.generate(
        labels, seed=args.seed, steps=args.steps, cfg=args.cfg, method=args.sampler,
        batch_size=args.batch_size, progress=not args.quiet,
    )  # fmt: skip
    lo, hi = model.pipeline.get("value_range", [-1.0, 1.0])
    if out.suffix.lower() == ".png" and model.has_decoder:
        x = model.decode(x, provider=args.provider)  # latents -> images with the float VAE decoder
    imgs = np.clip((x - lo) / (hi - lo), 0, 1)  # [0, 1] images
    if out.suffix.lower() == ".npy":
        from ditq.files import atomic_path

        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, x)
    else:
        from ditq.runtime.images import grid_image, save_png

        rows = [imgs[i * args.per_class : (i + 1) * args.per_class] for i in range(len(classes))]
        save_png(grid_image(rows, row_labels=[str(c) for c in classes]), out)
    msg = f"wrote {out}: {len(classes)} classes x {args.per_class}, {args.sampler}-{args.steps}, cfg {args.cfg}, seed {args.seed}"
    if model.pipeline.get("judge") == "digits" and model.pipeline.get("space") == "pixel":
        from ditq.runtime.metrics import DigitJudge

        acc = DigitJudge.load().accuracy(imgs, labels)
        msg += f"; the digit judge recognises {100 * acc:.1f}% of them"
    print(f"{msg} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_eval(args) -> int:
    from ditq.workflows.evaluate import evaluate, parse_configs

    seeds = int_list(args.seeds, "--seeds", 0, SEED_MAX)
    features = real = None
    if args.inception or args.real_images:
        if not (args.inception and args.real_images):
            raise DitqError("--inception and --real-images go together")
        from ditq.runtime.metrics import inception_features, load_images

        features, real = inception_features(args.inception), load_images(args.real_images)
    report = evaluate(
        args.model, parse_configs(args.configs, args.group_size), num_samples=args.num_samples, steps=args.steps,
        cfg=args.cfg, sampler=args.sampler, seeds=seeds, group_size=args.group_size, symmetric=args.symmetric,
        method=args.method, provider=args.provider, exports_dir=args.exports, grid_path=args.grid, features=features,
        real_images=real, calib_fn=lambda loaded, recipe: _calibration(args, loaded, recipe), layer_error=args.layer_error,
        progress=not args.quiet,
    )  # fmt: skip
    print(report.table())
    if args.json:
        _write_json(Path(args.json), report.to_dict())
    if args.grid:
        print(f"wrote {args.grid}")
    return 0


def cmd_bench(args) -> int:
    from ditq.workflows.bench import bench, check_goals, parse_variants

    report = bench(
        args.model, parse_variants(args.variants, args.group_size), batch=args.batch, runs=args.runs,
        threads=args.threads, provider=args.provider, work_dir=args.keep, quality=args.quality,
        quality_steps=args.steps, profile=args.profile, image_size=args.image_size, progress=not args.quiet,
    )  # fmt: skip
    print(report.table())
    if args.json:
        _write_json(Path(args.json), report.to_dict())
    if args.check:
        fails = check_goals(report)
        for f in fails:
            print(f"goal not met: {f}")
        return 1 if fails else 0
    return 0


def _robuq_recipe(args, loaded=None):
    """Recipe.robuq from --abits/--no-rotate/--mixed (mixed: activation bits allocated on the model,
    loaded from --model when not given)."""
    from ditq.calib.robuq import mixed_recipe
    from ditq.recipe import Recipe

    if not args.mixed:
        return Recipe.robuq(args.abits, rotate=not args.no_rotate)
    if loaded is None:
        if not getattr(args, "model", None):
            raise DitqError("--mixed allocates activation bits on a model's measured sensitivity: give --model")
        loaded = _loaded_of(args)
    mixed = mixed_recipe(loaded.model, args.abits, rotate=not args.no_rotate, schedule=loaded.schedule,
                         clip_denoised=bool(loaded.pipeline.get("clip_denoised")), progress=not args.quiet)  # fmt: skip
    print("activation bits per unit: " + ", ".join(f"{u.replace('transformer_blocks.', 'b')}={b}" for u, b in mixed.bits_per_unit.items()),
          file=sys.stderr)  # fmt: skip
    return mixed.recipe


def cmd_qat(args) -> int:
    from ditq.calib.qat import run_qat
    from ditq.calib.train import TrainConfig
    from ditq.models import load_model

    loaded = load_model(args.model)  # once: for --mixed's sensitivities and for the training
    recipe = _robuq_recipe(args, loaded)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=min(50, args.steps // 10),
                      min_lr_ratio=0.1, ema_decay=0.999, seed=args.seed, save_every=max(1, min(250, args.steps)))  # fmt: skip
    info = run_qat(args.model, recipe, args.out, cfg, checkpoint=args.checkpoint, progress=not args.quiet, force=args.force,
                   loaded=loaded)  # fmt: skip
    losses = info["losses_per_100_steps"]
    trend = f"; loss per 100 steps {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
    print(f"wrote {args.out} (QAT {args.steps} steps in {info['seconds']:.0f} s{trend}); "
          f"export it with: ditq export --model {args.out} --recipe {args.out}/recipe.json --out OUT")  # fmt: skip
    return 0


def cmd_train_digits(args) -> int:
    from ditq.calib.digits import train_digits_model, train_judge
    from ditq.calib.train import TrainConfig
    from ditq.files import check_out_dir
    from ditq.models import BUILTIN
    from ditq.runtime.metrics import default_judge_path

    out = Path(args.out) if args.out else BUILTIN["digits"]
    if not args.judge_only:  # before anything is trained or written
        check_out_dir(out, protect=[args.checkpoint] if args.checkpoint else [], force=args.force)
    judge = train_judge(default_judge_path())
    print(f"judge: held-out accuracy {100 * judge['held_out_accuracy']:.1f}% -> {default_judge_path()}")
    if args.judge_only:
        return 0
    rec = train_digits_model(out, TrainConfig(steps=args.steps, seed=args.seed), checkpoint=args.checkpoint,
                             progress=not args.quiet, force=args.force)  # fmt: skip
    print(f"digits DiT: {rec['parameters']:,} parameters, {args.steps} steps in {rec['seconds'] / 60:.1f} min, "
          f"final loss {rec['loss_per_100_steps'][-1] if rec['loss_per_100_steps'] else float('nan'):.4f} -> {out}")  # fmt: skip
    return 0


def cmd_search(args) -> int:
    import time
    from dataclasses import replace

    from tqdm.auto import tqdm

    from ditq.workflows.fitness import FitnessConfig, ParallelFitness
    from ditq.calib.search import (
        Journal, SearchConfig, evolve, fitness_of, genes_of, genome_cost, genome_recipe, parse_budget, settings_dict,
    )  # fmt: skip
    from ditq.models import load_model
    from ditq.recipe import Recipe

    t0 = time.perf_counter()
    base = Recipe.qdit(args.wbits, args.abits, args.group_size, args.symmetric)
    loaded = load_model(args.model)
    genes = genes_of(base.resolve(loaded.model), int_list(args.space, "--space", 1, 2**20))
    budget = parse_budget(args.budget, genes, args.wbits, args.abits)
    scfg = SearchConfig(
        population=args.population, generations=args.generations, top_k=args.top_k,
        crossovers=args.crossovers, mutations=args.mutations, seed=args.seed,
    )  # fmt: skip
    fcfg = FitnessConfig(num_samples=args.num_samples, steps=args.fitness_steps, rmse_weight=args.rmse_weight)
    settings = settings_dict(model=loaded.source, base=base.to_dict(), space=[list(g.choices) for g in genes],
                             budget=budget, search=scfg, fitness=fcfg)  # fmt: skip
    journal = Journal(args.journal, settings, metrics=("fid", "rmse"))  # the two the summary prints
    for note in journal.notes:
        print(f"ditq: note: {note}", file=sys.stderr)

    def cost(g):
        return genome_cost(genes, g, args.wbits, args.abits)

    expected = scfg.population + (scfg.generations - 1) * (scfg.crossovers + scfg.mutations)
    bar = tqdm(total=expected, desc="search", unit="eval", initial=0, disable=args.quiet)
    best = [float("inf")]

    def on_result(rec):
        best[0] = min(best[0], fitness_of(rec))
        bar.update()
        bar.set_postfix(best=f"{best[0]:.3f}", fid="failed" if rec.get("failed") else f"{rec['fid']:.2f}")

    def evaluate(genomes):
        if evaluate.pool is None:
            evaluate.pool = ParallelFitness(args.model, base, genes, fcfg, workers=args.workers)
        return evaluate.pool(genomes)

    evaluate.pool = None
    if journal.records:
        bar.update(len(journal.records))
        best[0] = min(fitness_of(r) for r in journal.records.values())
    ok = False
    try:
        res = evolve(genes, scfg, budget, cost, evaluate, journal, on_result=on_result)
        ok = True
    finally:
        bar.close()
        if evaluate.pool is not None:
            evaluate.pool.close(abort=not ok)
    recipe = replace(genome_recipe(base, genes, res.best), method=args.method)
    _write_text(Path(args.out), recipe.to_json() + "\n")
    r = res.best_record
    print(f"best of {len(journal.records)} evaluated genomes ({res.evaluated} now, {res.reused} from the journal): "
          f"fitness {r['fitness']:.3f} (FID-digits {r['fid']:.2f}, RMSE vs float {r['rmse']:.4f}), "
          f"cost {cost(res.best) / budget:.3f} of the budget, in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    print("group sizes: " + ", ".join(f"{ge.name.removeprefix('transformer_blocks.')}={g}" for ge, g in zip(genes, res.best)))
    print(f"wrote {args.out}")
    return 0


def cmd_fitness(args) -> int:
    """The search's fitness of whole configurations on several seed sets: can it tell them apart?"""
    from ditq.workflows.fitness import FitnessConfig, ParallelFitness
    from ditq.models import load_model
    from ditq.workflows.evaluate import parse_configs

    configs = parse_configs(args.configs, args.group_size)
    named = {c.name: c.recipe(args.symmetric) for c in configs}
    model = load_model(args.model).model
    for r in named.values():  # fail here, not inside a worker
        r.resolve(model)
    del model
    seeds = int_list(args.seeds, "--seeds", 0, SEED_MAX)
    rows: dict[str, list[dict]] = {n: [] for n in named}
    for s in seeds:
        fcfg = FitnessConfig(num_samples=args.num_samples, steps=args.fitness_steps, rmse_weight=args.rmse_weight, seed=s)
        pool = ParallelFitness(args.model, cfg=fcfg, workers=args.workers)
        ok = False
        try:
            for n, m in pool.recipes(named).items():
                rows[n].append({"seed": s, **m})
            ok = True
        finally:
            pool.close(abort=not ok)
    print(f"fitness = FID-digits + {args.rmse_weight} x RMSE vs float; {args.num_samples} samples, DDIM-{args.fitness_steps}, seed sets {seeds}")
    print(f"{'config':<12} " + " ".join(f"{'seed ' + str(s):>22}" for s in seeds))
    for n, per in rows.items():
        print(f"{n:<12} " + " ".join(f"{m['fitness']:>8.3f} ({m['fid']:.2f}, {m['rmse']:.3f})" for m in per))
    ranks = [sorted(named, key=lambda n: rows[n][i]["fitness"]) for i in range(len(seeds))]
    consistent = all(r == ranks[0] for r in ranks)
    print(f"ranking (best first): {' < '.join(ranks[0])}; {'the same' if consistent else 'NOT the same'} on every seed set")
    if args.json:
        _write_json(Path(args.json), {"rows": rows, "rankings": ranks, "consistent": consistent})
    return 0 if consistent else 1


def _write_text(path: Path, text: str) -> None:
    """Write atomically: a temporary sibling renamed over the final name."""
    from ditq.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(obj, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    from ditq.fileformat import DEFAULT_OPSET, INT2_OPSET, MAX_OPSET, TARGETS

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

    p = sub.add_parser("sample", help="generate images from an exported model with ONNX Runtime alone")
    p.add_argument("path", help="exported folder or model.onnx")
    p.add_argument("--classes", help="comma-separated class ids (default: every class)")
    p.add_argument("--per-class", type=int_in(1, MAX_COUNT), default=8,
                   help="samples per class: the grid's columns (default 8; all samples together at most 1 GiB)")
    _add_sampler_args(p)
    p.add_argument("--batch-size", type=int_in(1, MAX_BATCH), default=256, help="samples per ONNX Runtime call (doubled by guidance)")
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", required=True, help="grid.png (labelled image grid) or samples.npy (raw samples)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="quantize, export and sample several configurations; FID-digits and class accuracy")
    p.add_argument("--model", default="digits", help="model to evaluate (default: the shipped digits model)")
    p.add_argument("--configs", default="fp,w8a8,w6a8,w4a8,w4a16", help="comma-separated: fp, wXaY[gN], or recipe .json files (default fp,w8a8,w6a8,w4a8,w4a16)")
    p.add_argument("--group-size", type=_group, default=64, help="group size of configs without gN (default 64)")
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--method", choices=("rtn", "gptq"), help="weight method of the quantized configs (default: rtn / the recipe file's)")
    _add_calib_args(p)
    p.add_argument("--layer-error", action="store_true", help="also report the block linears' mean relative output error on held-out inputs")
    p.add_argument("--num-samples", type=int_in(1, MAX_SAMPLES), default=500, help="samples per seed set (default 500, one class after another)")
    p.add_argument("--seeds", default="0", help="comma-separated seed sets; more than one reports the spread (default 0)")
    _add_sampler_args(p, seed=False)
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--exports", help="keep the exported models in this folder (default: a temporary one)")
    p.add_argument("--grid", help="write a PNG of the same seeds across configurations")
    p.add_argument("--inception", help="pytorch-fid Inception weights (.pth, local) for FID of non-digit models")
    p.add_argument("--real-images", help="real images for --inception: .npy [N,C,H,W] in [0,1]")
    p.add_argument("--json", help="write the report as JSON")
    p.set_defaults(func=cmd_eval)

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
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("fitness", help="the search's fitness of whole configurations on several seed sets (exit 1 if rankings differ)")
    p.add_argument("--model", default="digits")
    p.add_argument("--configs", required=True, help="comma-separated wXaY[gN] or recipe .json files")
    p.add_argument("--group-size", type=_group, default=64)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--seeds", default="1,2,3", help="seed sets (default 1,2,3)")
    _add_fitness_args(p)
    p.add_argument("--json", help="write the table as JSON")
    p.set_defaults(func=cmd_fitness)

    p = sub.add_parser("bench", help="latency, size, peak RSS and error of quantized exports vs float ONNX Runtime")
    p.add_argument("--model", default="digits", help="built-in model, preset (dit-xl-2, ...) or path (default digits)")
    p.add_argument("--image-size", type=int, choices=(256, 512), help="presets: image size (latents of size/8)")
    p.add_argument("--variants", default="float,ort-int8,ort-int4,w8a8,w4a8,w4a8@qdq",
                   help="float, ort-int8 (quantize_dynamic), ort-int4 (MatMulNBitsQuantizer), or eval's configurations "
                        "(wXaY[gN], w1.58aY[h], recipe .json), target ort unless @qdq "
                        "(default: float,ort-int8,ort-int4,w8a8,w4a8,w4a8@qdq)")  # fmt: skip
    p.add_argument("--group-size", type=_group_or_auto, default="auto",
                   help="group size of wXaY variants (gN: of their weight+activation block linears only), or "
                        "'auto': 128, else the largest of 64/32/16 the model's widths take (default auto)")  # fmt: skip
    p.add_argument("--batch", type=int_in(1, MAX_BATCH), default=1, help="batch of one denoising step (default 1)")
    p.add_argument("--runs", type=int_in(1, 10_000), default=10, help="timed runs per variant, interleaved (default 10)")
    p.add_argument("--threads", type=int_in(1, 1024), help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quality", type=int_in(0, MAX_SAMPLES), default=0, metavar="N", help="digits: also sample N images per variant for FID-digits and class accuracy")
    p.add_argument("--steps", type=int_in(1, MAX_STEPS), default=50, help="DDIM steps of --quality sampling (default 50)")
    p.add_argument("--profile", action="store_true", help="also profile each variant: share of kernel time per op type")
    p.add_argument("--keep", help="build the variants in this folder and keep them (default: a temporary folder)")
    p.add_argument("--check", action="store_true", help="exit 1 unless the ort target's speed/size/memory goals hold")
    p.add_argument("--json", help="write {rows: [{variant, latency_ratio, size_ratio, rss_ratio, rel_error, ...}]}")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("qat", help="RobuQ quantization-aware training of the digits DiT (ternary weights, rotated low-bit activations)")
    p.add_argument("--model", default="digits", help="a digits model (the training data are scikit-learn's digits)")
    p.add_argument("--abits", type=int, default=4, choices=range(1, 9), metavar="{1..8}", help="activation bits of the block linears (average with --mixed)")
    p.add_argument("--no-rotate", action="store_true", help="no Hadamard rotation")
    p.add_argument("--mixed", action="store_true", help="allocate activation bits per layer (DP on measured sensitivity), averaging --abits")
    p.add_argument("--steps", type=int_in(1, 10**7), default=1000, help="training steps (default 1000, about 7 min alone on 2 CPU cores)")
    p.add_argument("--batch-size", type=int_in(1, MAX_BATCH), default=128)
    p.add_argument("--lr", type=float_in(0.0, 1.0, open_lo=True), default=2e-4)
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0)
    p.add_argument("--checkpoint", help="resumable checkpoint file")
    p.add_argument("--out", required=True, help="output diffusers folder (weights + recipe.json): new, empty, or an earlier ditq output")
    _add_force_arg(p)
    p.set_defaults(func=cmd_qat)

    p = sub.add_parser("train-digits", help="train the digit judge and the shipped digits DiT from scratch (CPU)")
    p.add_argument("--steps", type=int_in(1, 10**7), default=6000, help="training steps of batch 128 (default 6000)")
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0)
    p.add_argument("--out", help="output diffusers folder (default: the shipped ditq/assets/digits)")
    p.add_argument("--checkpoint", help="resumable training checkpoint file (written every 500 steps)")
    p.add_argument("--judge-only", action="store_true", help="train only the judge (seconds)")
    _add_force_arg(p)
    p.set_defaults(func=cmd_train_digits)
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
    p.add_argument("--fitness-steps", type=int_in(1, MAX_STEPS), default=25, help="DDIM steps per fitness evaluation (default 25)")
    p.add_argument("--rmse-weight", type=float_in(0.0, 1e6), default=20.0, help="fitness = FID-digits + this x RMSE vs float samples")
    p.add_argument("--workers", type=int_in(1, 256), default=2, help="parallel evaluation processes (default 2)")


def _add_sampler_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    from ditq.runtime.samplers import METHODS

    p.add_argument("--steps", type=int_in(1, MAX_STEPS), default=50, help="denoising steps (default 50)")
    p.add_argument("--cfg", type=float_in(0.0, MAX_CFG), default=1.5, help="classifier-free guidance scale; 1 = none (default 1.5)")
    p.add_argument("--sampler", default="ddim", choices=METHODS, help="ddim (deterministic) or ddpm (default ddim)")
    if seed:
        p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0, help="seed of the starting noise (default 0)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except DitqError as e:
        print(f"ditq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ditq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
