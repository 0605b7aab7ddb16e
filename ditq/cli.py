"""``ditq`` command line: a thin layer over the workflows (:mod:`ditq.workflows`). Each handler turns the
parsed options (:mod:`ditq.cli_args`) into the workflow's typed arguments, calls it and prints its result.

Exit codes: 0 success / validation passed, 1 validation failed, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

from ditq.cli_args import build_parser
from ditq.errors import DitqError
from ditq.options import SEED_MAX, int_list


def _recipe_options(args):
    """The recipe the flags describe (``ditq export``, ``ditq recipe``)."""
    from ditq.workflows.export import RecipeOptions

    return RecipeOptions(wbits=args.wbits, abits=args.abits, group_size=args.group_size, symmetric=args.symmetric,
                         rotate=not args.no_rotate, mixed=args.mixed, recipe_file=args.recipe or None,
                         method=getattr(args, "method", None))  # fmt: skip


def _calibration_options(args):
    from ditq.workflows.export import CalibrationOptions

    return CalibrationOptions(num_samples=args.calib_samples, timesteps=args.calib_timesteps, cache_dir=args.calib_cache)


def _print_allocation(bits_per_unit: dict[str, int] | None) -> None:
    """A mixed-precision recipe's activation bits, on stderr."""
    if bits_per_unit is not None:
        print("activation bits per unit: " + ", ".join(f"{re.sub(r'^.*?[.](?=[0-9]+[.])', 'b', u, count=1)}={b}" for u, b in bits_per_unit.items()),
              file=sys.stderr)  # fmt: skip


def cmd_export(args) -> int:
    from ditq.models import load_model
    from ditq.workflows.export import export_model

    loaded = load_model(args.model, image_size=args.image_size, seed=args.seed, num_heads=args.num_heads)
    done = export_model(loaded, _recipe_options(args), args.out, target=args.target, opset=args.opset,
                        calibration=_calibration_options(args), force=args.force, progress=not args.quiet, consume_model=True)  # fmt: skip
    _print_allocation(done.bits_per_unit)
    res = done.result
    kernels = f", {res.kernels} layers on ONNX Runtime kernels" if res.kernels else ""
    print(f"wrote {res.model_path} ({res.file_bytes / 1e6:.2f} MB, {res.layers} quantized weights, "
          f"{res.activation_quantizers} activation quantizers{kernels}) in {res.seconds:.1f} s")  # fmt: skip
    return 0


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
    from ditq.models import load_model
    from ditq.workflows.export import build_recipe

    loaded = load_model(args.model, image_size=args.image_size, seed=args.seed, num_heads=args.num_heads) if args.model else None
    built = build_recipe(_recipe_options(args), loaded, progress=not args.quiet)
    _print_allocation(built.bits_per_unit)
    if built.covered is not None:
        print(f"{built.covered} covered layers", file=sys.stderr)
    text = built.recipe.to_json() + "\n"
    if args.out:
        _write_text(Path(args.out), text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_sample(args) -> int:
    from ditq.workflows.sample import check_prompt_options, prompt_to_file, sample_to_file

    check_prompt_options(prompt=args.prompt, negative_prompt=args.negative_prompt, guidance=args.guidance, classes=args.classes,
                         images=args.images)  # fmt: skip
    if args.prompt is not None:
        res = prompt_to_file(args.path, args.out, prompt=args.prompt, negative_prompt=args.negative_prompt, images=args.images,
                             seed=args.seed, steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                             batch_size=min(args.batch_size, 16), provider=args.provider, progress=not args.quiet)  # fmt: skip
        print(f"wrote {res.out}: {res.images} image(s) of the prompt, {res.sampler}-{args.steps}, guidance {res.guidance:g}, "
              f"seed {args.seed} ({res.seconds:.1f} s)")  # fmt: skip
        return 0
    res = sample_to_file(args.path, args.out, classes=args.classes, per_class=args.per_class, seed=args.seed, steps=args.steps,
                         cfg=args.cfg, sampler=args.sampler, batch_size=args.batch_size, provider=args.provider,
                         progress=not args.quiet)  # fmt: skip
    msg = f"wrote {res.out}: {len(res.classes)} classes x {res.per_class}, {res.sampler}-{args.steps}, cfg {args.cfg}, seed {args.seed}"
    if res.judge_accuracy is not None:
        msg += f"; the digit judge recognises {100 * res.judge_accuracy:.1f}% of them"
    print(f"{msg} ({res.seconds:.1f} s)")
    return 0


def cmd_eval(args) -> int:
    from ditq.workflows.evaluate import evaluate, parse_configs

    seeds = int_list(args.seeds, "--seeds", 0, SEED_MAX)
    report = evaluate(
        args.model, parse_configs(args.configs, args.group_size), num_samples=args.num_samples, steps=args.steps,
        cfg=args.cfg, sampler=args.sampler, seeds=seeds, group_size=args.group_size, symmetric=args.symmetric,
        method=args.method, provider=args.provider, exports_dir=args.exports, grid_path=args.grid, features=args.inception,
        real_images=args.real_images, calibration=_calibration_options(args),
        layer_error=args.layer_error, progress=not args.quiet,
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


def cmd_qat(args) -> int:
    from ditq.workflows.qat import QATOptions, qat

    options = QATOptions(abits=args.abits, rotate=not args.no_rotate, mixed=args.mixed, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed)  # fmt: skip
    res = qat(args.model, options, args.out, checkpoint=args.checkpoint, force=args.force, progress=not args.quiet)
    _print_allocation(res.bits_per_unit)
    losses = res.losses_per_100_steps
    trend = f"; loss per 100 steps {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
    print(f"wrote {args.out} (QAT {args.steps} steps in {res.seconds:.0f} s{trend}); "
          f"export it with: ditq export --model {args.out} --recipe {args.out}/recipe.json --out OUT")  # fmt: skip
    return 0


def cmd_train_digits(args) -> int:
    from ditq.calib.train import TrainConfig
    from ditq.workflows.train import train_digits

    res = train_digits(args.out or None, TrainConfig(steps=args.steps, seed=args.seed), checkpoint=args.checkpoint,
                       judge_only=args.judge_only, force=args.force, progress=not args.quiet)  # fmt: skip
    print(f"judge: held-out accuracy {100 * res.judge_accuracy:.1f}% -> {res.judge_path}")
    if res.out_dir is not None:
        print(f"digits DiT: {res.parameters:,} parameters, {res.steps} steps in {res.seconds / 60:.1f} min, "
              f"final loss {res.final_loss:.4f} -> {res.out_dir}")  # fmt: skip
    return 0


def cmd_train_digits_t2i(args) -> int:
    from dataclasses import replace

    from ditq.calib.train_t2i import DEFAULT_CONFIG
    from ditq.workflows.train_t2i import train_digits_t2i

    res = train_digits_t2i(args.out, replace(DEFAULT_CONFIG, steps=args.steps, seed=args.seed), checkpoint=args.checkpoint,
                           force=args.force, progress=not args.quiet, threads=args.threads)  # fmt: skip
    print(f"digits-t2i: {res.parameters:,} parameters, {res.steps} steps in {res.seconds / 60:.1f} min, "
          f"final loss {res.final_loss:.4f} -> {res.out_dir}")  # fmt: skip
    return 0


def cmd_search(args) -> int:
    from ditq.calib.search import SearchConfig
    from ditq.workflows.search import SearchOptions, prepare_search

    options = SearchOptions(
        wbits=args.wbits, abits=args.abits, group_size=args.group_size, symmetric=args.symmetric,
        space=tuple(int_list(args.space, "--space", 1, 2**20)), budget=args.budget, fitness=_fitness_config(args),
        search=SearchConfig(population=args.population, generations=args.generations, top_k=args.top_k,
                            crossovers=args.crossovers, mutations=args.mutations, seed=args.seed),
        workers=args.workers, method=args.method,
    )  # fmt: skip
    run = prepare_search(args.model, options, args.journal)
    for note in run.notes:
        print(f"ditq: note: {note}", file=sys.stderr)
    done = run.run(progress=not args.quiet)
    _write_text(Path(args.out), done.recipe.to_json() + "\n")
    print(done.summary())
    print(f"wrote {args.out}")
    return 0


def cmd_sensitivity(args) -> int:
    from ditq.workflows.sensitivity import layer_sensitivity

    groups = int_list(args.group_sizes, "--group-sizes", 1, 1 << 20)
    report = layer_sensitivity(args.model, wbits=args.wbits, abits=args.abits, group_sizes=groups, symmetric=args.symmetric,
                               progress=not args.quiet)  # fmt: skip
    print(report.table())
    if args.json:
        _write_json(Path(args.json), report.to_dict())
    return 0


def cmd_fitness(args) -> int:
    """The search's fitness of whole configurations on several seed sets: can it tell them apart?"""
    from ditq.workflows.evaluate import parse_configs
    from ditq.workflows.search import compare_fitness

    configs = parse_configs(args.configs, args.group_size)
    seeds = int_list(args.seeds, "--seeds", 0, SEED_MAX)
    res = compare_fitness(args.model, configs, seeds=seeds, symmetric=args.symmetric, fitness=_fitness_config(args),
                          workers=args.workers)  # fmt: skip
    print(res.table())
    if args.json:
        _write_json(Path(args.json), res.to_dict())
    return 0 if res.consistent else 1


def _fitness_config(args):
    from ditq.workflows.fitness import FitnessConfig

    return FitnessConfig(num_samples=args.num_samples, steps=args.fitness_steps, rmse_weight=args.rmse_weight)


def _write_text(path: Path, text: str) -> None:
    """Write atomically: a temporary sibling renamed over the final name."""
    from ditq.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(obj, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    if not sys.warnoptions:  # libraries' deprecation notices are not the user's to act on (``python -W`` shows them)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        # the handler is looked up when called: ``cmd_<command>`` of this module
        return globals()["cmd_" + args.command.replace("-", "_")](args)
    except DitqError as e:
        print(f"ditq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ditq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
