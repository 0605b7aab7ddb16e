"""A text-to-image pipeline folder's text encoders and tokenizers, read as untrusted input (the torch side:
transformers builds them; :mod:`ditq.exporter.text_encoders` writes them as ONNX, :mod:`ditq.text` holds
the record and the torch-free tokenization).

- **Which**: the family's :meth:`~ditq.families.FamilySpec.text_encoders_for` the folder's pipeline class
  (``model_index.json``); a subfolder the family needs and the folder lacks is refused in one line naming it.
- **Configs**: the fields of :data:`CLIP_TEXT_CONFIG` / :data:`T5_CONFIG`, each checked and bounded; the model
  is built from those fields alone by transformers' own class for the kind (:data:`ENCODER_CLASSES`), never
  through ``AutoModel`` or remote code (``auto_map`` and every other field are ignored).
- **Weights**: ``model.safetensors`` (else ``pytorch_model.bin``, read weights-only) or the shards an index
  names, which must be exactly the model's tensors, finite (:func:`ditq.weights.load_weights`); a tied pair
  stored once (T5's ``shared.weight`` = ``encoder.embed_tokens.weight``) is completed from its twin.
- **Tokenizers**: transformers' ``AutoTokenizer`` with local files only, no remote code, the fast
  (``tokenizers``) backend; :func:`tokenizer_json` picks the JSON the export carries and proves it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ditq.errors import DitqError, one_line, shown
from ditq.families import FamilySpec
from ditq.text import MAX_TOKEN_ID, MAX_TOKENIZER_BYTES, TEXT_KINDS, TextEncoder, parse_tokenizer
from ditq.untrusted import Float, Int, OneOf, check_fields, read_json, read_regular
from ditq.weights import TRANSFORMERS_WEIGHT_FILES, diffusers_weight_files, load_weights, read_weight_files

ENCODER_CLASSES = {"clip": "CLIPTextModel", "clip-projection": "CLIPTextModelWithProjection", "t5": "T5EncoderModel"}
MISSING_TRANSFORMERS = "exporting a text-to-image pipeline's text encoders needs transformers: pip install 'ditq[text]'"

# CLIPTextConfig's fields that set the model's size or arithmetic (the others, e.g. the pad and start token
# ids, do not change what the encoder computes), with transformers' defaults (CLIP-L's text
# tower: 12 layers of 768, 77 positions; CLIP-G's: 32 layers of 1280). The bounds are far beyond both.
CLIP_TEXT_CONFIG: dict[str, Any] = {
    "model_type": OneOf(("clip_text_model",), "clip_text_model"),
    "vocab_size": Int(1, MAX_TOKEN_ID + 1, 49408),
    "hidden_size": Int(1, 16384, 512),
    "intermediate_size": Int(1, 65536, 2048),
    "projection_dim": Int(1, 16384, 512),
    "num_hidden_layers": Int(1, 256, 12),
    "num_attention_heads": Int(1, 256, 8),
    "max_position_embeddings": Int(1, 4096, 77),
    "hidden_act": OneOf(("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"), "quick_gelu"),
    "layer_norm_eps": Float(0.0, 1.0, 1e-5, open_lo=True),
    "attention_dropout": Float(0.0, 1.0, 0.0),
    "eos_token_id": Int(0, MAX_TOKEN_ID, 49407),  # the pooled token; 2 (legacy configs): the largest id's place
}
# T5Config's, with its defaults (T5-XXL's encoder: 24 layers of 4096, 64 heads of 64, gated-gelu of 10240).
T5_CONFIG: dict[str, Any] = {
    "model_type": OneOf(("t5",), "t5"),
    "vocab_size": Int(1, MAX_TOKEN_ID + 1, 32128),
    "d_model": Int(1, 16384, 512),
    "d_kv": Int(1, 1024, 64),
    "d_ff": Int(1, 65536, 2048),
    "num_layers": Int(1, 256, 6),
    "num_heads": Int(1, 256, 8),
    "relative_attention_num_buckets": Int(1, 4096, 32),
    "relative_attention_max_distance": Int(1, 1 << 20, 128),
    "layer_norm_epsilon": Float(0.0, 1.0, 1e-6, open_lo=True),
    "feed_forward_proj": OneOf(tuple(f"{g}{a}" for g in ("", "gated-") for a in ("relu", "gelu", "gelu_new", "silu")), "relu"),
}


def check_text_config(kind: str, obj: Any, where: str) -> dict[str, Any]:
    """The config keyword arguments of a ``kind`` encoder (:data:`TEXT_KINDS`) from a config object
    (untrusted; other fields dropped), every field checked; one :class:`DitqError` naming ``where`` otherwise."""
    schema = T5_CONFIG if kind == "t5" else CLIP_TEXT_CONFIG
    cfg = check_fields(obj, schema, where)
    cfg = {k: cfg[k] for k in schema if k != "model_type"}
    if kind != "t5" and cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise DitqError(f"{where}: hidden_size {cfg['hidden_size']} is not divisible by num_attention_heads {cfg['num_attention_heads']}")
    if kind != "t5" and cfg["eos_token_id"] >= cfg["vocab_size"] and cfg["eos_token_id"] != 2:
        raise DitqError(f"{where}: eos_token_id {cfg['eos_token_id']} is not an id of the {cfg['vocab_size']}-token vocabulary")
    return cfg


def transformers_module():
    """The ``transformers`` package, or one line saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise DitqError(MISSING_TRANSFORMERS) from None
    return transformers


def encoder_builder(kind: str, cfg: dict[str, Any]) -> Callable[[], Any]:
    """A function building the ``kind`` encoder of the checked ``cfg`` (eager attention: the one that traces)."""
    tf = transformers_module()
    config_cls = tf.T5Config if kind == "t5" else tf.CLIPTextConfig
    ids = {} if kind == "t5" else {"bos_token_id": None, "pad_token_id": None}  # unused by the encoder; defaults outside small vocabularies
    config = config_cls(**cfg, **ids, attn_implementation="eager")
    model_cls = getattr(tf, ENCODER_CLASSES[kind])
    return lambda: model_cls(config)


def load_text_encoder(root: str | Path, enc: TextEncoder):
    """The float32 eval-mode encoder ``enc`` of the pipeline folder ``root`` (its ``enc.folder``)."""
    import torch

    folder = Path(root) / enc.folder
    cfg_file = folder / "config.json"
    cfg = check_text_config(enc.kind, read_json(cfg_file), str(cfg_file))
    if enc.kind != "t5" and enc.max_length > cfg["max_position_embeddings"]:
        raise DitqError(f"{cfg_file}: max_position_embeddings {cfg['max_position_embeddings']} is fewer than the "
                        f"{enc.max_length} tokens the pipeline feeds it")  # fmt: skip
    build = encoder_builder(enc.kind, cfg)
    tensors = read_weight_files(diffusers_weight_files(folder, TRANSFORMERS_WEIGHT_FILES))
    if enc.kind == "clip" and all(k.startswith("text_model.") for k in tensors):  # transformers 4's names; 5 drops the prefix
        tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    with torch.device("meta"):
        twin = build()
    tied: dict[int, list[str]] = {}
    for name, p in twin.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    for names in tied.values():  # one parameter under several names: the file may hold it under any of them
        held = [n for n in names if n in tensors]
        if held and any(not torch.equal(tensors[held[0]], tensors[n]) for n in held[1:]):
            raise DitqError(f"{folder}: {shown(held[0])} and {shown(held[1])} are one tied weight, but the file holds two different ones")
        tensors.update({n: tensors[held[0]] for n in names if held and n not in tensors})
    return load_weights(build, tensors, str(folder))


def load_tokenizer(folder: str | Path):
    """The transformers tokenizer of a pipeline's tokenizer ``folder`` (local files only, no remote code),
    which must have the fast (``tokenizers``) backend. transformers reads the folder's files unbounded, so
    each must first be a regular file (a FIFO would block the read) of at most :data:`MAX_TOKENIZER_BYTES`."""
    tf = transformers_module()
    for f in sorted(Path(folder).iterdir()):
        if f.is_dir():
            continue
        if not f.is_file() or f.stat().st_size > MAX_TOKENIZER_BYTES:
            raise DitqError(f"{f}: not a regular file of at most {MAX_TOKENIZER_BYTES >> 20} MB, as a tokenizer's files are")
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers and the tokenizers library raise many types for a folder they cannot read
        raise DitqError(f"{folder}: not a tokenizer transformers reads from local files ({one_line(e, 200)})") from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise DitqError(f"{folder}: the tokenizer has no tokenizers backend to export ({type(tok).__name__})")
    return tok


def text_encoders_of(root: str | Path, spec: FamilySpec) -> tuple[TextEncoder, ...]:
    """The text part of the pipeline record of the pipeline folder ``root`` for the family ``spec`` (empty
    for a class-conditioned family): per encoder the family's lengths and flags, and the pad id of the
    folder's tokenizer. A subfolder the family needs and the folder lacks is refused, naming it; an optional
    encoder (SD3's T5) that ``model_index.json`` names as none (``[null, null]``, as diffusers saves a pipeline
    built without it) is left out."""
    if not spec.text_encoders:
        return ()
    root = Path(root)
    index = read_json(root / "model_index.json")
    pipeline_class = index.get("_class_name")
    name = pipeline_class if isinstance(pipeline_class, str) else f"{spec.class_name} pipeline"
    out = []
    for es in spec.text_encoders_for(pipeline_class):
        if es.optional and index.get(es.folder, ...) in (None, [None, None]):
            continue  # the pipeline runs without it
        if not set(es.outputs) <= set(TEXT_KINDS.get(es.kind, ())):
            raise ValueError(f"{spec.class_name}: text encoder {es.folder} asks for outputs {es.outputs} of a {es.kind!r} encoder")
        for sub, what in ((es.folder, f"text encoder {es.folder}/ ({ENCODER_CLASSES[es.kind]})"), (es.tokenizer, f"tokenizer {es.tokenizer}/")):
            file = root / sub / ("config.json" if sub == es.folder else "")
            if not (file.is_file() if sub == es.folder else file.is_dir()):
                raise DitqError(f"{root}: {shown(name, 60, quote=False)} needs the {what}, which the folder lacks")
        tok = load_tokenizer(root / es.tokenizer)
        if not isinstance(tok.pad_token_id, int):
            raise DitqError(f"{root / es.tokenizer}: the tokenizer has no padding token; the pipeline pads prompts to {es.max_length} tokens")
        out.append(TextEncoder(folder=es.folder, kind=es.kind, tokenizer=es.tokenizer + ".json", max_length=es.max_length,
                               pad_id=tok.pad_token_id, attention_mask=es.attention_mask, pad_to_max_length=es.pad_to_max_length,
                               truncation=es.truncation))  # fmt: skip
    return tuple(out)


def check_prompts(enc: TextEncoder) -> list[str]:
    """Prompts an export is checked on: empty, plain, upper case and punctuation, non-ASCII, and one longer
    than ``enc.max_length`` tokens (truncated)."""
    return ["", "a photo of a cat", "A RED car, on the river!", "naïve café in Zürich, 東京", " ".join(["a big dog"] * enc.max_length)]


def pipeline_tokenize(tok, enc: TextEncoder, prompts: list[str]):
    """``(input_ids, attention_mask)`` (numpy int64) of ``prompts`` by the transformers tokenizer ``tok``,
    called as the family's pipeline calls it."""
    out = tok(prompts, padding="max_length" if enc.pad_to_max_length else "longest", max_length=enc.max_length,
              truncation=enc.truncation, return_tensors="np")  # fmt: skip
    return out["input_ids"].astype("int64"), out["attention_mask"].astype("int64")


def tokenizer_json(root: str | Path, enc: TextEncoder, tok) -> str:
    """The tokenizers JSON an export carries for ``enc``: the tokenizer folder's ``tokenizer.json`` when it
    has one, else ``tok``'s backend serialised; the first of them that tokenizes :func:`check_prompts` to
    exactly the ids and mask the pipeline's own tokenizer ``tok`` gives (:meth:`TextEncoder.tokenize`).
    Neither: refused in one line."""
    folder = Path(root) / enc.tokenizer.removesuffix(".json")
    prompts = check_prompts(enc)
    want = pipeline_tokenize(tok, enc, prompts)
    candidates = []
    if (folder / "tokenizer.json").is_file():
        candidates.append(read_regular(folder / "tokenizer.json", max_bytes=MAX_TOKENIZER_BYTES).decode("utf-8", errors="replace"))
    candidates.append(tok.backend_tokenizer.to_str())
    for text in candidates:
        try:
            got = enc.tokenize(enc.configured(parse_tokenizer(text, str(folder / "tokenizer.json"))), prompts)
        except DitqError:  # a file the library reads but cannot tokenize the prompts with: try the next
            continue
        if all(g.shape == w.shape and (g == w).all() for g, w in zip(got, want)):
            return text
    raise DitqError(f"{folder}: the tokenizers library does not reproduce this tokenizer's ids (padding or truncation "
                    f"side, or options transformers adds); ditq exports only tokenizers it reproduces exactly")  # fmt: skip


class TextEncoderGraph(nn.Module):
    """What the ONNX file computes: the encoder's outputs of :data:`~ditq.text.TEXT_KINDS` for its kind."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if self.kind == "t5":
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        out = self.model(input_ids=input_ids, output_hidden_states=True)
        pooled = out.text_embeds if self.kind == "clip-projection" else out.pooler_output  # (B, P) / (B, D)
        return out.last_hidden_state, out.hidden_states[-2], pooled  # (B, T, D) x 2
