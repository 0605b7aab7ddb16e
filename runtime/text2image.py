"""Images from a prompt with an exported text-to-image model, in ONNX Runtime alone (``ditq sample
--prompt``; no torch, no transformers: the ``tokenizers`` package reads the tokenizers).

An export of a diffusers pipeline folder holds the transformer (``model.onnx``, whose metadata names its
family, config and :class:`~ditq.pipeline.Pipeline`), the float text encoders and their tokenizers (the
pipeline record's ``text``) and the float VAE decoder. The family's spec (:mod:`ditq.families`) gives
everything family-specific; this module never asks which family it runs. One run:

1. prompt -> token ids: each encoder's tokenizer, on the family's :meth:`~ditq.families.FamilySpec.prompt_text`,
   cut to ``max_length`` tokens (``truncation``) and padded with ``pad_id`` to ``max_length``
   (``pad_to_max_length``; else to the longest prompt of the batch), as the pipeline's tokenizer call does;
2. ids -> each encoder's outputs (its ``attention_mask`` input fed the tokenizer's mask when the record
   says so) -> :meth:`~ditq.families.FamilySpec.compose_prompt`: the transformer's text inputs, for the
   prompt and, with classifier-free guidance, the negative prompt (``""`` unless given);
3. seeded noise -> the scheduler's steps over the transformer (:meth:`~ditq.families.FamilySpec.feeds`,
   :meth:`~ditq.families.FamilySpec.prediction`): a flow-matching schedule's Euler steps
   (:func:`~ditq.runtime.samplers.sample_flow`), or DDIM/DDPM/DPM-Solver++ (:func:`~ditq.runtime.samplers.sample`;
   by default the sampler the scheduler config asks for: DPM-Solver++(2M) for PixArt's).
   Guidance at scale ``G``, as the diffusers pipelines apply it:

   =========================================  ====================================================================
   the graph takes a ``guidance`` input       ``G`` is that input (guidance-distilled Flux); one batch, no
                                              negative prompt
   the family's pipeline has no negative-     the prompt rows only; ``G`` does nothing (FluxPipeline without
   prompt guidance                            ``guidance_embeds``); a negative prompt is refused
   otherwise, ``G > 1``                       one batch ``[negative rows, prompt rows]``;
                                              ``p = p_neg + G (p_pos - p_neg)`` on the prediction channels
                                              (learned variance values from the prompt rows), float32
   otherwise, ``G <= 1``                      the prompt rows only
   =========================================  ====================================================================
4. latents -> ``vae_decoder.onnx`` (which undoes the latent scaling and shift) -> images in ``value_range``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ditq.errors import DitqError, shown
from ditq.families import FamilySpec
from ditq.fileformat import META_PIPELINE
from ditq.flow import FlowMatchSpec
from ditq.pipeline import Pipeline
from ditq.runtime.generate import check_sample_budget, export_config, open_export
from ditq.runtime.samplers import sample, sample_flow
from ditq.runtime.session import OrtDiT, create_session, run_session
from ditq.text import TextEncoder
from ditq.untrusted import inside

MAX_PROMPT_CHARS = 20_000  # a prompt's characters (every pipeline cuts it to at most 512 tokens anyway)
GUIDANCE_INPUT = "guidance"  # the graph input of a guidance-distilled model


@dataclass
class PromptEncoder:
    """One text encoder of an export: its record, its tokenizer and its ONNX Runtime session."""

    record: TextEncoder
    tokenizer: Any  # tokenizers.Tokenizer, set up to pad and cut as the record says
    session: Any
    where: str

    @classmethod
    def open(cls, folder: Path, record: TextEncoder, where: str, *, provider: str, threads: int | None) -> "PromptEncoder":
        onnx_path, tok_path = record.paths(folder, where)
        for p, what in ((onnx_path, "text encoder"), (tok_path, "tokenizer")):
            if not p.is_file():
                state = "is not a regular file in" if p.exists() or p.is_symlink() else "is missing from"
                raise DitqError(f"{where}: the {what} {p.name} of {record.folder} {state} {folder}")
        tokenizer = record.read_tokenizer(folder, where)
        session = create_session(onnx_path, provider=provider, threads=threads)
        names = {i.name for i in session.get_inputs()}
        if names != set(record.input_names):
            raise DitqError(f"{onnx_path}: the graph's inputs are {sorted(names)}; the record says {list(record.input_names)}")
        return cls(record, tokenizer, session, str(onnx_path))

    def __call__(self, texts: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``({output name: array}, attention mask [B, T] int64)`` for ``texts``."""
        ids, mask = self.record.tokenize(self.tokenizer, texts)
        feeds = {"input_ids": ids, **({"attention_mask": mask} if self.record.attention_mask else {})}
        outs = run_session(self.session, feeds, list(self.record.outputs), where=self.where)
        return dict(zip(self.record.outputs, outs)), mask


@dataclass
class TextToImageModel:
    """An exported text-to-image model opened in ONNX Runtime: transformer, text encoders, VAE decoder."""

    fn: OrtDiT
    path: Path
    spec: FamilySpec
    config: dict[str, Any]
    pipeline: Pipeline
    encoders: list[PromptEncoder]
    provider: str = "cpu"

    @classmethod
    def open(cls, path: str | Path, *, provider: str = "cpu", threads: int | None = None) -> "TextToImageModel":
        file, fn, meta, spec = open_export(path, provider=provider, threads=threads)
        if not spec.text_conditioned:
            raise DitqError(f"{file}: {spec.class_name} is class-conditioned: it takes --classes, not a prompt")
        config = export_config(file, meta, spec)
        pipeline = Pipeline.from_metadata(meta, file, fit=(None, spec.sample_shape(config)))
        at = f"{file}: {META_PIPELINE}"
        if not pipeline.text:
            raise DitqError(f"{at} records no text encoders: re-export the model from its diffusers pipeline folder")
        spec.check_text(pipeline.text, at)
        flow = spec.prediction_type == "flow"
        if flow != isinstance(pipeline.schedule, FlowMatchSpec):
            kind = "a flow-matching" if flow else "a DDPM-family"
            raise DitqError(f"{at}: {spec.class_name} samples with {kind} schedule; the record holds another")
        if pipeline.has_decoder:  # refused here, before any sampling, if it links out of the folder
            inside(file.parent, pipeline.vae, f"{at}.vae")
        encoders = [PromptEncoder.open(file.parent, rec, at, provider=provider, threads=threads) for rec in pipeline.text]
        return cls(fn, file, spec, config, pipeline, encoders, provider)

    # ------------------------------------------------------------------------------------------- text
    @property
    def guidance_input(self) -> bool:
        """The graph takes the guidance scale as an input (a guidance-distilled model): no CFG batch."""
        return GUIDANCE_INPUT in self.fn.input_names

    def encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """The transformer's text inputs (:meth:`~ditq.families.FamilySpec.compose_prompt`), one row per prompt."""
        for p in prompts:
            if not isinstance(p, str) or len(p) > MAX_PROMPT_CHARS:
                raise DitqError(f"a prompt must be text of at most {MAX_PROMPT_CHARS} characters, got {shown(p, 60)}")
        texts = [self.spec.prompt_text(p) for p in prompts]
        encoded, masks = {}, {}
        for enc in self.encoders:
            encoded[enc.record.folder], masks[enc.record.folder] = enc(texts)
        return self.spec.compose_prompt(encoded, masks, self.config)

    # ------------------------------------------------------------------------------------------ steps
    def _predict(self, x: np.ndarray, t: np.ndarray, cond: dict[str, np.ndarray], guidance: float | None) -> np.ndarray:
        """The model's prediction ``[B, C, H, W]`` (and its learned variance channels, if any)."""
        feeds = self.spec.feeds(self.config, x, t, cond, guidance)
        out = self.fn.run_feeds(feeds)
        pred = self.spec.prediction(self.config, out, x)
        p, v = self.spec.output_split(self.config)
        return np.concatenate([pred, out[:, p : p + v]], axis=1) if v else pred

    def guided(self, x: np.ndarray, t: np.ndarray, cond: dict[str, np.ndarray], uncond: dict[str, np.ndarray] | None,
               guidance: float) -> np.ndarray:  # fmt: skip
        """One step's guided prediction at samples ``x`` and timesteps ``t`` (one per row); ``cond`` and
        ``uncond``: the prompt's and the negative prompt's text inputs, one row per sample (see the module
        docstring's table)."""
        if self.guidance_input:
            return self._predict(x, t, cond, guidance)
        if uncond is None or guidance <= 1:
            return self._predict(x, t, cond, None)
        b = len(x)
        both = {k: np.concatenate([uncond[k], cond[k]]) for k in cond}
        out = self._predict(np.concatenate([x, x]), np.concatenate([t, t]), both, None)
        p = self.spec.output_split(self.config)[0]
        u, c = out[:b], out[b:]
        mixed = u[:, :p] + guidance * (c[:, :p] - u[:, :p])
        return np.concatenate([mixed, c[:, p:]], axis=1) if out.shape[1] > p else mixed

    def generate(self, prompt: str, *, negative_prompt: str | None = None, n: int = 1, seed: int = 0, steps: int = 28,
                 guidance: float = 5.0, sampler: str | None = None, batch_size: int = 16, noise: np.ndarray | None = None,
                 progress: bool = False, trajectory: list | None = None) -> np.ndarray:  # fmt: skip
        """``n`` latents of ``prompt`` ``[n, C, H, W]`` from seeded noise (sample ``k`` of a seed is the same
        for every ``n``) or ``noise``; ``sampler`` (ddim/ddpm/dpm++2m; None: the schedule's default) applies to
        DDPM-family schedules only."""
        shape = self.spec.sample_shape(self.config)
        if negative_prompt is not None and self.guidance_input:
            raise DitqError(f"{self.path}: this model takes the guidance scale as an input (guidance-distilled); "
                            "it has no negative prompt")  # fmt: skip
        if negative_prompt is not None and not self.spec.negative_prompt_guidance:
            raise DitqError(f"{self.path}: {self.spec.class_name} pipelines do not guide with a negative prompt; "
                            "sample without --negative-prompt")  # fmt: skip
        check_sample_budget(n, shape)
        if noise is None:
            noise = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
        cfg = self.spec.negative_prompt_guidance and not self.guidance_input and guidance > 1
        rows = self.encode([prompt, negative_prompt or ""] if cfg else [prompt])
        out = []
        for i in range(0, n, batch_size):
            x = noise[i : i + batch_size]
            cond = {k: np.repeat(v[:1], len(x), axis=0) for k, v in rows.items()}
            uncond = {k: np.repeat(v[1:2], len(x), axis=0) for k, v in rows.items()} if cfg else None
            out.append(self._denoise(x, cond, uncond, guidance=guidance, steps=steps, sampler=sampler, seed=seed * 100003 + i,
                                     progress=progress, trajectory=trajectory))  # fmt: skip
        return np.concatenate(out)

    def generate_prompts(self, prompts: list[str], *, seed: int = 0, steps: int = 28, guidance: float = 5.0, sampler: str | None = None,
                         batch_size: int = 16, progress: bool = False) -> np.ndarray:  # fmt: skip
        """One latent per prompt of ``prompts`` ``[len(prompts), C, H, W]`` (``ditq eval``'s held-out prompts):
        row ``k`` starts from the same seeded noise as :meth:`generate`'s sample ``k``; each distinct prompt is
        encoded once; guidance with the empty negative prompt as :meth:`generate` guides."""
        shape = self.spec.sample_shape(self.config)
        n = len(prompts)
        check_sample_budget(n, shape)
        noise = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
        distinct = list(dict.fromkeys(prompts))
        where = {p: i for i, p in enumerate(distinct)}
        cfg = self.spec.negative_prompt_guidance and not self.guidance_input and guidance > 1
        rows = self.encode([*distinct, ""] if cfg else distinct)
        pick = np.array([where[p] for p in prompts], np.int64)
        out = []
        for i in range(0, n, batch_size):
            x = noise[i : i + batch_size]
            cond = {k: v[pick[i : i + batch_size]] for k, v in rows.items()}
            uncond = {k: np.repeat(v[len(distinct) :], len(x), axis=0) for k, v in rows.items()} if cfg else None
            out.append(self._denoise(x, cond, uncond, guidance=guidance, steps=steps, sampler=sampler, seed=seed * 100003 + i,
                                     progress=progress, trajectory=None))  # fmt: skip
        return np.concatenate(out)

    def _denoise(self, x, cond, uncond, *, guidance, steps, sampler, seed, progress, trajectory) -> np.ndarray:
        schedule = self.pipeline.schedule
        if isinstance(schedule, FlowMatchSpec):
            def velocity(xs: np.ndarray, t: np.float32) -> np.ndarray:
                return self.guided(xs, np.full(len(xs), t, np.float32), cond, uncond, guidance)

            tokens = self.spec.image_tokens(self.config)
            return sample_flow(velocity, x, schedule=schedule, steps=steps, image_tokens=tokens, progress=progress, trajectory=trajectory)

        def model(xs: np.ndarray, t: np.ndarray, _rows: np.ndarray) -> np.ndarray:  # every row takes the prompt
            return self.guided(xs, t, cond, uncond, guidance)

        return sample(model, x, np.zeros(len(x), np.int64), schedule=schedule, steps=steps, method=sampler, cfg=1.0, seed=seed,
                      clip_denoised=self.pipeline.clip_denoised, progress=progress, trajectory=trajectory)  # fmt: skip

    # ------------------------------------------------------------------------------------------ images
    def decode(self, latents: np.ndarray, *, batch_size: int = 4) -> np.ndarray:
        """Latents -> images in the pipeline's ``value_range`` with the exported float VAE decoder."""
        if not self.pipeline.has_decoder:
            raise DitqError(f"{self.path} carries no VAE decoder: write the latents with --out FILE.npy")
        vae = inside(self.path.parent, self.pipeline.vae, f"{self.path}: {META_PIPELINE}.vae")
        session = create_session(vae, provider=self.provider)
        name, out = session.get_inputs()[0].name, []
        for i in range(0, len(latents), batch_size):
            out.append(run_session(session, {name: np.ascontiguousarray(latents[i : i + batch_size], np.float32)}, where=str(vae))[0])
            if i == 0:  # the first batch tells the size of a decoded image
                check_sample_budget(len(latents), out[0].shape[1:], "decoded images")
        return np.concatenate(out)
