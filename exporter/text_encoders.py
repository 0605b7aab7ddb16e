"""``ditq export`` of a text-to-image pipeline folder, the text side: each text encoder the family needs as a
float ONNX file and its tokenizer as a ``tokenizers`` JSON file, next to the transformer (the files and their
record: :mod:`ditq.text`; reading the folder: :mod:`ditq.encoders`).

An encoder is traced (torch.onnx dynamo, eager attention) through :class:`TextEncoderGraph`::

    input_ids [B, T] int64 (+ attention_mask [B, T] int64)  ->  TEXT_KINDS[kind]
        clip, clip-projection:  last_hidden_state [B, T, D], penultimate [B, T, D] (hidden_states[-2]),
                                pooled [B, D] (pooler_output) or [B, P] (text_embeds)
        t5:                     last_hidden_state [B, T, D]

with ``B`` and ``T`` dynamic (``T`` up to CLIP's positions). The file is self-contained when its weights fit
in ``external_data_bytes`` (the transformer's rule), else they go to ``<file>.data``.

Then it is checked: ONNX Runtime against the torch encoder on :func:`~ditq.encoders.check_prompts` tokenized
as the pipeline tokenizes them, every output at least :data:`TEXT_FLOOR_DB` SQNR. Both run the same float32
arithmetic, so they differ by rounding and operation order only (over 120 dB on the tiny encoders of the
tests); a wrong operation, input or output costs far more than the 40 dB of margin.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn

from ditq.calib.numerics import sqnr_db
from ditq.encoders import TextEncoderGraph, check_prompts, load_text_encoder, load_tokenizer, pipeline_tokenize, tokenizer_json
from ditq.exporter.trace import quiet_export, strip_trace_metadata
from ditq.runtime.session import create_session
from ditq.text import MAX_TEXT_TOKENS, TextEncoder

TEXT_FLOOR_DB = 80.0  # ONNX Runtime vs torch, float32 both: see the module docstring


def export_text_encoder(model: nn.Module, enc: TextEncoder, path: Path, *, opset: int) -> None:
    """Trace ``model`` (the encoder ``enc``) to ``path`` (+ ``path.data``), dynamic batch and text length."""
    max_tokens = model.config.max_position_embeddings if enc.kind != "t5" else MAX_TEXT_TOKENS
    tokens = max(2, min(enc.max_length, 16, max_tokens))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, tokens), generator=g)
    inputs: tuple[torch.Tensor, ...] = (ids,)
    if enc.attention_mask:
        mask = torch.ones_like(ids)
        mask[0, tokens // 2 :] = 0
        inputs = (ids, mask)
    batch = torch.export.Dim("batch", min=1, max=4096)
    length = torch.export.Dim("tokens", min=2, max=max(max_tokens, 2))
    quiet_export(TextEncoderGraph(model, enc.kind).eval(), inputs, path, what=f"the text encoder {enc.folder}", opset=opset,
                 input_names=list(enc.input_names), output_names=list(enc.outputs),
                 dynamic_shapes=tuple({0: batch, 1: length} for _ in inputs))  # fmt: skip


def check_text_encoder(model: nn.Module, enc: TextEncoder, path: Path, ids: np.ndarray, mask: np.ndarray) -> float:
    """The lowest SQNR (dB) of the ONNX file ``path``'s outputs against ``model``'s on ``ids`` (and ``mask``);
    below :data:`TEXT_FLOOR_DB` is an error of the export, raised."""
    feeds = {"input_ids": ids, "attention_mask": mask} if enc.attention_mask else {"input_ids": ids}
    got = create_session(path).run(None, feeds)
    with torch.no_grad():
        want = TextEncoderGraph(model, enc.kind)(*(torch.from_numpy(v) for v in feeds.values()))
    want = (want,) if enc.kind == "t5" else want
    worst = min(sqnr_db(w.numpy(), g) for w, g in zip(want, got))
    if not worst >= TEXT_FLOOR_DB:  # a bug of the export, not bad input: reported loudly
        raise RuntimeError(f"the exported text encoder {enc.folder} differs from transformers' ({worst:.1f} dB < {TEXT_FLOOR_DB} dB)")
    return worst


def write_text_encoders(root: str | Path, text: tuple[TextEncoder, ...], stage: Path, work: Path, *, opset: int,
                        external_data_bytes: int) -> list[dict[str, Any]]:  # fmt: skip
    """Write each encoder of ``text`` from the pipeline folder ``root`` into ``stage`` (an export being
    assembled; ``work``: its scratch folder): the ONNX file, checked (:func:`check_text_encoder`), and the
    tokenizer JSON (:func:`~ditq.encoders.tokenizer_json`). Returns the manifest's entries."""
    entries = []
    for enc in text:
        tok = load_tokenizer(Path(root) / enc.tokenizer.removesuffix(".json"))
        (stage / enc.tokenizer).write_text(tokenizer_json(root, enc, tok))
        model = load_text_encoder(root, enc)
        traced = work / enc.onnx
        export_text_encoder(model, enc, traced, opset=opset)
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        large = weight_bytes > external_data_bytes
        proto = onnx.load(str(traced), load_external_data=not large)
        strip_trace_metadata(proto)
        data = work / (enc.onnx + ".data")
        if large and data.exists():  # the weights stay in the data file the exporter wrote, named by its plain name
            shutil.move(str(data), str(stage / data.name))
        onnx.save_model(proto, str(stage / enc.onnx))
        del proto
        ids, mask = pipeline_tokenize(tok, enc, check_prompts(enc))
        db = check_text_encoder(model, enc, stage / enc.onnx, ids, mask)
        entries.append({"folder": enc.folder, "kind": enc.kind, "onnx": enc.onnx, "tokenizer": enc.tokenizer,
                        "min_sqnr_db": None if db == float("inf") else round(db, 1)})  # fmt: skip
        del model
    return entries

