"""Loading DiTs: presets with seeded random weights, diffusers folders, original DiT checkpoints.

Every loader returns a :class:`LoadedModel`: a float32 ``diffusers.DiTTransformer2DModel`` in eval mode
plus a JSON-able ``source`` that says how to load it again (the exported model carries it, so
``ditq validate`` can rebuild the reference).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditq.adapters import FamilyAdapter, adapter_for, supported
from ditq.families import spec_for
from ditq.presets import FAMILY_PRESETS, family_preset_config
from ditq.encoders import text_encoders_of
from ditq.errors import DitqError, one_line, shown
from ditq.manifest import file_sha256
from ditq.pipeline import VAE_DECODER_FILE, Pipeline
from ditq.untrusted import VAE_CONFIG, check_dit_config, check_fields, read_json
from ditq.weights import diffusers_weight_files, load_weights, read_pickle, read_safetensors, read_weight_files, tensor_names
from ditq.flow import FlowMatchSpec, schedule_from_config
from ditq.schedule import SchedulerSpec

# The DiT paper's configurations: hidden size, depth, heads (patch 2, 4 latent channels, learned sigma,
# 1000 classes, 32x32 latents for 256x256 images).
PRESETS: dict[str, tuple[int, int, int]] = {
    "dit-s-2": (384, 12, 6),
    "dit-b-2": (768, 12, 12),
    "dit-l-2": (1024, 24, 16),
    "dit-xl-2": (1152, 28, 16),
}
# Heads of the original DiT models by hidden size (the checkpoint does not record them).
_HEADS_BY_HIDDEN = {h: n for h, _, n in PRESETS.values()}
DIT = adapter_for("DiTTransformer2DModel")  # the family the presets and checkpoint loaders build

# Models trained by the project and shipped with it (diffusers folders under ditq/assets/).
ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN: dict[str, Path] = {"digits": ASSETS / "digits", "digits-t2i": ASSETS / "digits-t2i"}


def digits_config() -> dict[str, Any]:
    """The shipped ``digits`` DiT: DiT-XL/2's blocks at hidden 192, 6 blocks, 3 heads, patch 2 on 8x8 grey
    images, 10 classes, epsilon prediction (no learned sigma)."""
    return dit_config(192, 6, 3, patch=2, in_channels=1, out_channels=1, sample_size=8, num_classes=10)


@dataclass
class LoadedModel:
    model: Any  # diffusers.DiTTransformer2DModel, float32, eval
    source: dict[str, Any]
    pipeline: Pipeline  # how to sample it: pipeline_info(source), computed once by the loader

    @property
    def schedule(self) -> SchedulerSpec:
        """The noise schedule and sampler settings it samples with (DiT's unless its pipeline says)."""
        return self.pipeline.schedule


def dit_config(
    hidden: int,
    depth: int,
    heads: int,
    *,
    patch: int = 2,
    in_channels: int = 4,
    out_channels: int | None = 8,
    sample_size: int = 32,
    num_classes: int = 1000,
    mlp_ratio: float = 4.0,
) -> dict[str, Any]:
    """diffusers ``DiTTransformer2DModel`` keyword arguments for a DiT of the given shape."""
    if hidden % heads:
        raise DitqError(f"hidden size {hidden} is not divisible by {heads} heads")
    if mlp_ratio != 4.0:
        raise DitqError(f"MLP ratio {mlp_ratio} is not supported (diffusers' DiT block uses 4)")
    return dict(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layers=depth,
        sample_size=sample_size,
        patch_size=patch,
        num_embeds_ada_norm=num_classes,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        activation_fn="gelu-approximate",
        attention_bias=True,
    )


# How to sample each built-in model: digits in pixel space, [-1, 1], so the predicted x0 is clipped; the
# digit judge scores its images.
BUILTIN_PIPELINE: dict[str, Pipeline] = {
    "digits": Pipeline(space="pixel", clip_denoised=True, value_range=(-1.0, 1.0), judge="digits",
                       conditioning=DIT.conditioning(digits_config())),  # fmt: skip
}


def build_dit(config: dict[str, Any], seed: int | None = 0):
    """A float32 eval-mode diffusers DiT; random weights drawn from ``seed`` without touching global RNG."""
    return DIT.build(config, seed)


def load_model(spec: str, *, image_size: int | None = None, seed: int = 0, num_heads: int | None = None) -> LoadedModel:
    """Load ``spec``: a preset name, a diffusers folder, or an original DiT checkpoint file."""
    if spec in BUILTIN:
        folder = BUILTIN[spec]
        if not ((folder / "config.json").is_file() or (folder / "model_index.json").is_file()):
            raise DitqError(f"the shipped {spec!r} weights are missing from {folder}; run `make train-{spec}` to recreate them")
        loaded = _load_diffusers(folder)
        source = {"kind": "builtin", "name": spec, "sha256": loaded.source["sha256"]}
        return LoadedModel(loaded.model, source, pipeline_info(source) if spec in BUILTIN_PIPELINE else loaded.pipeline)
    if spec in PRESETS:
        hidden, depth, heads = PRESETS[spec]
        sample = 32 if image_size is None else _latent_size(image_size)
        config = dit_config(hidden, depth, heads, sample_size=sample)
        model = build_dit(config, seed)
        source = {"kind": "preset", "name": spec, "seed": seed, "image_size": image_size}
        return LoadedModel(model, source, pipeline_info(source, config=config))
    if spec in FAMILY_PRESETS:
        config = family_preset_config(spec, image_size)
        adapter = adapter_for(FAMILY_PRESETS[spec][0])
        source = {"kind": "preset", "name": spec, "seed": seed, "image_size": image_size}
        return LoadedModel(adapter.build(config, seed), source, pipeline_info(source, config=config, adapter=adapter))
    path = Path(spec)
    if not path.exists():
        raise DitqError(
            f"model not found: {spec!r} is neither a built-in model ({', '.join(BUILTIN)}), "
            f"a preset ({', '.join([*PRESETS, *FAMILY_PRESETS])}) nor an existing file or folder"
        )
    if path.is_dir():
        return _load_diffusers(path)
    return _load_original(path, image_size=image_size, num_heads=num_heads)


def load_from_source(source: dict[str, Any]) -> LoadedModel:
    """Reload a model from the ``source`` record an exported model carries."""
    kind = source.get("kind")
    if kind == "builtin":
        loaded = load_model(source["name"])
        if source.get("sha256") and loaded.source["sha256"] != source["sha256"]:
            raise DitqError(f"the shipped {source['name']!r} weights changed since export (SHA-256 differs); re-export")
        return loaded
    if kind == "preset":
        return load_model(source["name"], image_size=source.get("image_size"), seed=source.get("seed", 0))
    if kind in ("diffusers", "dit-checkpoint"):
        loaded = load_model(source["path"], image_size=source.get("image_size"), num_heads=source.get("num_heads"))
        want = source.get("sha256")
        if want and loaded.source.get("sha256") != want:
            raise DitqError(f"{source['path']} changed since export (SHA-256 differs); pass --model explicitly")
        return loaded
    raise DitqError(f"unknown model source {source!r}")


def pipeline_info(source: dict[str, Any], *, config: dict[str, Any] | None = None, adapter: FamilyAdapter | None = None) -> Pipeline:
    """How to sample a model from this source (the loaders compute it once, as :attr:`LoadedModel.pipeline`):
    a built-in model's :data:`BUILTIN_PIPELINE`; a diffusers folder's :data:`~ditq.pipeline.PIPELINE_FILE`
    (written by ditq) read by :meth:`Pipeline.read_from`; a pipeline folder's scheduler config read as a
    :class:`SchedulerSpec` or :class:`~ditq.flow.FlowMatchSpec` (a setting ditq's samplers do not implement, or a
    scheduler of the other kind than the model's prediction, is refused here, naming it) and, with
    a ``vae/``, the decoder file and the latent scaling (and shift) factor, and for a text family its text
    encoders and tokenizers (:func:`~ditq.encoders.text_encoders_of`); else DiT's, in latent space. ``config``: the
    transformer's checked config (:func:`~ditq.untrusted.check_dit_config`) when the caller has it; else
    read here where the source names it (a folder's, a preset's), to give the class conditioning and the
    sample shape through ``adapter``, the model's family adapter (None: the one the config's
    ``_class_name`` names; DiT's, the family ditq's loaders build, when it names none)."""
    kind, name = source.get("kind"), source.get("name")
    if kind == "builtin" and name in BUILTIN_PIPELINE:
        return BUILTIN_PIPELINE[name]
    root = source_folder(source)
    if config is None and kind == "preset" and name in PRESETS:
        config = dit_config(*PRESETS[name])
    if kind == "preset" and name in FAMILY_PRESETS:
        config = family_preset_config(name, source.get("image_size")) if config is None else config
        adapter = adapter or adapter_for(FAMILY_PRESETS[name][0])
    if config is None and root is not None:
        config = _folder_config(root)
    if adapter is None:
        adapter = adapter_for(config["_class_name"]) if isinstance((config or {}).get("_class_name"), str) else DIT
    fit = None if config is None else (adapter.conditioning(config), adapter.sample_shape(config))
    written = Pipeline.read_from(root, fit=fit) if root is not None else None  # written by ditq (e.g. ditq qat)
    if written is not None:
        return written
    conditioning = None if fit is None else fit[0]
    if root is None or not (root / "model_index.json").is_file():
        return Pipeline(conditioning=conditioning)
    schedule, vae, scaling_factor, shift_factor = SchedulerSpec(), None, None, None
    sched = root / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        learned_sigma = None if config is None else adapter.output_split(config)[1] > 0
        index, sched_cfg = read_json(root / "model_index.json"), read_json(sched)
        schedule = schedule_from_config(sched_cfg, where=str(sched), learned_sigma=learned_sigma, pipeline_class=index.get("_class_name"),
                                        grids=adapter.spec.flow_grids)  # fmt: skip
    flow = adapter.spec.prediction_type == "flow"
    if flow != isinstance(schedule, FlowMatchSpec):
        what = "velocity (flow matching)" if flow else "noise (epsilon)"
        scheduler = shown(sched_cfg.get("_class_name"), 60, as_json=True) if sched.is_file() else "no scheduler config"
        raise DitqError(f"{sched}: {scheduler} does not sample {adapter.spec.class_name}, which predicts {what}")
    vae_file = root / "vae" / "config.json"
    if vae_file.is_file():
        vae_cfg = check_fields(read_json(vae_file), VAE_CONFIG, str(vae_file))
        vae, scaling_factor, shift_factor = VAE_DECODER_FILE, float(vae_cfg["scaling_factor"] or 0.18215), vae_cfg["shift_factor"]
    text = text_encoders_of(root, adapter.spec)  # a text family's encoders; one it needs and the folder lacks is refused
    return Pipeline(space="latent", schedule=schedule, vae=vae, scaling_factor=scaling_factor, shift_factor=shift_factor,
                    conditioning=conditioning, text=text)  # fmt: skip


def _folder_config(root: Path) -> dict[str, Any] | None:
    """The checked transformer config of a diffusers folder (a pipeline folder's ``transformer/``), if any,
    with its ``_class_name`` (the family whose spec checked it)."""
    file = root / ("transformer" if (root / "model_index.json").is_file() else "") / "config.json"
    if not file.is_file():
        return None
    cfg = read_json(file)
    name = cfg.get("_class_name") if isinstance(cfg, dict) else None
    spec = spec_for(name if isinstance(name, str) else DIT.class_name, str(file))
    return {**spec.check_config(cfg, str(file)), "_class_name": spec.class_name}


def load_vae(source: dict[str, Any]):
    """The float ``AutoencoderKL`` of a diffusers pipeline folder source."""
    folder = Path(source["path"]) / "vae"
    from diffusers import AutoencoderKL

    cfg = read_json(folder / "config.json")
    check_fields(cfg, VAE_CONFIG, f"{folder / 'config.json'}")
    tensors = read_weight_files(diffusers_weight_files(folder))

    def build():
        try:
            return AutoencoderKL.from_config(cfg)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, NotImplementedError, RuntimeError, ZeroDivisionError) as e:
            raise DitqError(f"{folder / 'config.json'}: not a usable AutoencoderKL config ({one_line(e, 200)})") from None

    return load_weights(build, tensors, f"{folder}")


def _latent_size(image_size: int) -> int:
    if image_size not in (256, 512):
        raise DitqError(f"--image-size must be 256 or 512, got {image_size}")
    return image_size // 8


# ------------------------------------------------------------------------------------------ diffusers
def _load_diffusers(path: Path) -> LoadedModel:
    folder = path
    if (path / "model_index.json").is_file():  # a pipeline folder: the DiT lives in transformer/
        folder = path / "transformer"
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise DitqError(f"{path}: not a diffusers model folder (no config.json{' in transformer/' if folder != path else ''})")
    cfg = read_json(cfg_file)
    cls_name = cfg.get("_class_name")
    if not isinstance(cls_name, str):
        raise DitqError(f"{path}: config.json names no architecture (_class_name); ditq supports: {', '.join(supported())}")
    try:
        adapter = adapter_for(cls_name)
    except DitqError as e:
        raise DitqError(f"{path}: {e}") from None
    config = adapter.spec.check_config(cfg, str(cfg_file))
    pipe = pipeline_info({"kind": "diffusers", "path": str(path.resolve())}, config=config, adapter=adapter)  # before any weights are read
    tensors = read_weight_files(diffusers_weight_files(folder))
    adapter.check_weights(config, tensors, str(folder))
    model = load_weights(lambda: adapter.build(config, seed=None), tensors, str(folder))
    digest = hashlib.sha256()
    for w in sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()):
        digest.update(file_sha256(folder / w).encode())
    return LoadedModel(model, {"kind": "diffusers", "path": str(path.resolve()), "sha256": digest.hexdigest()}, pipe)


# --------------------------------------------------------------------------------- original checkpoints
def read_state_dict(path: Path) -> dict[str, Any]:
    """Tensors of a ``.safetensors`` file, or of a ``.pt``/``.pth`` file loaded with ``weights_only=True``
    (a pickle that tries to build anything but tensors and containers is refused, not executed)."""
    import torch

    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = read_pickle(path)
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):  # training checkpoints nest the weights
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DitqError(f"{path}: not a state dict of tensors")
    return obj


class _ReadRecorder(dict):
    """A state dict that records which tensors were read (the ones a conversion did not read are extra)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _load_original(path: Path, *, image_size: int | None, num_heads: int | None) -> LoadedModel:
    sd = _ReadRecorder(read_state_dict(path))
    try:
        config, converted = convert_original_dit(sd, image_size=image_size, num_heads=num_heads, where=str(path))
    except KeyError as e:
        raise DitqError(f"{path}: incomplete DiT checkpoint (no tensor {shown(str(e.args[0]))})") from None
    except (ValueError, IndexError, ZeroDivisionError, TypeError, RuntimeError) as e:  # tensors of impossible shapes
        raise DitqError(f"{path}: not an original DiT state dict ({one_line(e, 200)})") from None
    unused = sorted(set(sd) - sd.read)
    if unused:
        raise DitqError(f"{path}: the weights do not fit a DiT: unexpected {tensor_names(unused)}")
    config = check_dit_config(config, f"{path} (the DiT its shapes describe)")
    model = load_weights(lambda: build_dit(config, seed=None), converted, str(path))
    use_original_timestep_sinusoid(model)
    source = {
        "kind": "dit-checkpoint",
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "image_size": image_size,
        "num_heads": num_heads,
    }
    return LoadedModel(model, source, pipeline_info(source, config=config))


# The timestep sinusoid of facebookresearch/DiT: cos/sin of t * exp(-ln(10000) i / half), i = 0..half-1
# (half = 128), i.e. diffusers' ``Timesteps(downscale_freq_shift=0)``; diffusers' DiT builds its embedders with
# shift 1 (``/ (half - 1)``), which moves every frequency but the first.
ORIGINAL_TIMESTEP_FREQ_SHIFT = 0


def use_original_timestep_sinusoid(model) -> None:
    """Make a diffusers DiT compute the original DiT's timestep sinusoid: every block's embedder (block 0's
    also conditions the final layer) takes ``ORIGINAL_TIMESTEP_FREQ_SHIFT``. The frequencies are a constant
    of the forward, so tracing the model bakes them into the ONNX graph."""
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = ORIGINAL_TIMESTEP_FREQ_SHIFT


def convert_original_dit(
    sd: dict[str, Any], *, image_size: int | None = None, num_heads: int | None = None, where: str = "checkpoint"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """facebookresearch/DiT state dict -> (diffusers config, diffusers state dict).

    The original model has one timestep and one class embedder; diffusers gives every block its own,
    so they are copied into each block. The fixed sin-cos ``pos_embed`` buffer is recomputed by diffusers.
    A model built from the config computes the original forward only after
    :func:`use_original_timestep_sinusoid` (the config has no field for the sinusoid's frequencies).
    """
    need = ("x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight", "t_embedder.mlp.0.weight")
    absent = [k for k in need if k not in sd]
    if absent:
        raise DitqError(f"{where}: unsupported architecture: not an original DiT state dict (missing {absent[0]!r})")
    w = sd["x_embedder.proj.weight"]
    hidden, in_ch, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    heads = num_heads or _HEADS_BY_HIDDEN.get(hidden)
    if heads is None:
        raise DitqError(f"{where}: hidden size {hidden} is not a DiT paper model; pass --num-heads")
    out_ch = int(sd["final_layer.linear.weight"].shape[0]) // (patch * patch)
    num_classes = int(sd["y_embedder.embedding_table.weight"].shape[0]) - 1  # last row: the CFG null class
    tokens = sd["pos_embed"].shape[1] if "pos_embed" in sd else None
    if image_size is not None:
        sample = _latent_size(image_size)
        if tokens is not None and tokens != (sample // patch) ** 2:
            raise DitqError(f"{where}: --image-size {image_size} does not match the checkpoint's {tokens} tokens")
    elif tokens is not None:
        sample = int(round(tokens**0.5)) * patch
    else:
        sample = 32
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    config = dit_config(
        hidden, depth, heads, patch=patch, in_channels=in_ch, out_channels=out_ch,
        sample_size=sample, num_classes=num_classes, mlp_ratio=mlp_ratio,
    )  # fmt: skip

    out: dict[str, Any] = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.qkv.{p}"].chunk(3, dim=0)
            out[f"{dst}attn1.to_q.{p}"], out[f"{dst}attn1.to_k.{p}"], out[f"{dst}attn1.to_v.{p}"] = q, k, v
            out[f"{dst}attn1.to_out.0.{p}"] = sd[f"{src}attn.proj.{p}"]
            out[f"{dst}ff.net.0.proj.{p}"] = sd[f"{src}mlp.fc1.{p}"]
            out[f"{dst}ff.net.2.{p}"] = sd[f"{src}mlp.fc2.{p}"]
            out[f"{dst}norm1.linear.{p}"] = sd[f"{src}adaLN_modulation.1.{p}"]
            out[f"{dst}norm1.emb.timestep_embedder.linear_1.{p}"] = sd[f"t_embedder.mlp.0.{p}"]
            out[f"{dst}norm1.emb.timestep_embedder.linear_2.{p}"] = sd[f"t_embedder.mlp.2.{p}"]
        out[f"{dst}norm1.emb.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    return config, out


def source_folder(source: dict[str, Any]) -> Path | None:
    """The diffusers folder a model ``source`` record is read from: a folder source's path, a built-in
    model's shipped folder; None for the others (presets, checkpoint files)."""
    kind, name = source.get("kind"), source.get("name")
    if kind == "builtin":
        return BUILTIN.get(name)
    return Path(source.get("path", "")) if kind == "diffusers" else None


def source_paths(source: dict[str, Any]) -> list[Path]:
    """The files or folders a model ``source`` record is read from: what an output folder may never replace."""
    if source.get("kind") == "builtin" and source.get("name") in BUILTIN:
        return [BUILTIN[source["name"]]]
    path = source.get("path")
    return [Path(path)] if isinstance(path, str) and path else []
