"""A text-to-image export's text encoders and tokenizers, torch-free: the typed record of one encoder
(:class:`TextEncoder`, a part of :class:`ditq.pipeline.Pipeline`, read as untrusted input like the rest of
it) and the tokenization its family's diffusers pipeline does, with the ``tokenizers`` package alone.

An export of a pipeline folder holds, per text encoder of the family (``FamilySpec.text_encoders``)::

    text_encoder_N.onnx        the float encoder (+ text_encoder_N.onnx.data when its weights are large)
                               inputs:  input_ids [B, T] int64 (+ attention_mask [B, T] int64: PixArt's T5)
                               outputs: TEXT_KINDS[kind]
    tokenizer_N.json           the tokenizer (tokenizers' JSON), which :meth:`TextEncoder.tokenize` runs as
                               the pipeline calls it: padding="max_length", max_length, truncation=True

File names are plain names of the export folder built from diffusers' subfolder names (``text_encoder``,
``text_encoder_2``, ..., ``tokenizer``, ``tokenizer_2``, ...), so a record cannot name a file elsewhere, and
:meth:`TextEncoder.paths` refuses a symbolic link out of the folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ditq.errors import DitqError, one_line, shown
from ditq.untrusted import Bool, Int, ListOf, OneOf, Text, check_fields, inside, read_regular

# The text encoders ditq exports, by kind: the outputs of the ONNX file, in order. "penultimate" is the
# hidden state before the last encoder layer (transformers' hidden_states[-2]); "pooled" is CLIPTextModel's
# pooler_output, CLIPTextModelWithProjection's text_embeds.
TEXT_KINDS: dict[str, tuple[str, ...]] = {
    "clip": ("last_hidden_state", "penultimate", "pooled"),  # CLIPTextModel
    "clip-projection": ("last_hidden_state", "penultimate", "pooled"),  # CLIPTextModelWithProjection
    "t5": ("last_hidden_state",),  # T5EncoderModel
}
# The pipeline subfolders a text encoder and its tokenizer come from (diffusers' names); the files ditq writes
# for them are these names + ".onnx" and + ".json", plain names of the export folder.
TEXT_ENCODER_FOLDER = re.compile(r"text_encoder(_[1-9])?")
TOKENIZER_FOLDER = re.compile(r"tokenizer(_[1-9])?")
MAX_TEXT_ENCODERS = 4  # SD3: three
MAX_TEXT_TOKENS = 4096  # a prompt's tokens (max_length): CLIP 77, T5 up to 512 in the pipelines ditq knows
MAX_TOKEN_ID = (1 << 24) - 1  # vocabularies: CLIP 49408, T5 32128


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a text-to-image export: the float ONNX file :attr:`onnx` (inputs
    :attr:`input_names`: ``input_ids`` ``[B, T]`` int64, and ``attention_mask`` ``[B, T]`` int64 when the
    family's pipeline passes the tokenizer's mask; outputs :attr:`outputs`, those of its ``kind``) and the
    tokenizer file ``tokenizer`` (``tokenizers``' JSON) that turns a prompt into its ids, padded with
    ``pad_id`` to ``max_length`` tokens when ``pad_to_max_length`` and cut to ``max_length`` when
    ``truncation``. ``folder``, the pipeline subfolder it came from, names its outputs to the family
    (``FamilySpec.compose_prompt``)."""

    folder: str
    kind: str
    tokenizer: str
    max_length: int
    pad_id: int
    attention_mask: bool = False
    pad_to_max_length: bool = True
    truncation: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, takes: str) -> DitqError:
            return DitqError(f"text encoder {name} must be {takes}, got {shown(getattr(self, name), 60)}")

        if not isinstance(self.folder, str) or not TEXT_ENCODER_FOLDER.fullmatch(self.folder):
            raise bad("folder", "text_encoder or text_encoder_N (N = 1..9)")
        if not isinstance(self.kind, str) or self.kind not in TEXT_KINDS:
            raise bad("kind", "one of " + ", ".join(TEXT_KINDS))
        if not isinstance(self.tokenizer, str) or not self.tokenizer.endswith(".json") or not TOKENIZER_FOLDER.fullmatch(self.tokenizer[:-5]):
            raise bad("tokenizer", "tokenizer.json or tokenizer_N.json (N = 1..9)")
        for name, hi in (("max_length", MAX_TEXT_TOKENS), ("pad_id", MAX_TOKEN_ID)):
            v = getattr(self, name)
            if type(v) is not int or not (0 if name == "pad_id" else 1) <= v <= hi:
                raise bad(name, f"an integer in {0 if name == 'pad_id' else 1}..{hi}")
        for name in ("attention_mask", "pad_to_max_length", "truncation"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if self.attention_mask and self.kind != "t5":
            raise DitqError(f"text encoder {self.folder}: attention_mask is a T5 input; a {self.kind} encoder takes input_ids only")

    @property
    def onnx(self) -> str:
        """The ONNX file's name in the export folder (its external data, when it has any: this + ``.data``)."""
        return self.folder + ".onnx"

    @property
    def outputs(self) -> tuple[str, ...]:
        return TEXT_KINDS[self.kind]

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask") if self.attention_mask else ("input_ids",)

    def paths(self, folder: str | Path, where: str) -> tuple[Path, Path]:
        """``(ONNX file, tokenizer file)`` in the export ``folder``; a symbolic link out of it is refused."""
        return inside(folder, self.onnx, f"{where}.text"), inside(folder, self.tokenizer, f"{where}.text")

    def read_tokenizer(self, folder: str | Path, where: str):
        """The tokenizer file in the export ``folder`` as a ``tokenizers.Tokenizer`` (read bounded, at most
        :data:`MAX_TOKENIZER_BYTES`), set up by :meth:`configured`."""
        path = self.paths(folder, where)[1]
        return self.configured(parse_tokenizer(read_regular(path, max_bytes=MAX_TOKENIZER_BYTES), str(path)))

    def configured(self, tokenizer):
        """``tokenizer`` (a ``tokenizers.Tokenizer``) padding and truncating as the pipeline's call does:
        ``truncation=True, max_length`` cuts at ``max_length`` tokens, special tokens included;
        ``padding="max_length"`` pads with ``pad_id`` to ``max_length`` (else to the batch's longest), on the
        right; whatever padding or truncation the file itself records is replaced."""
        tokenizer.no_truncation()
        tokenizer.no_padding()
        if self.truncation:
            tokenizer.enable_truncation(self.max_length)
        pad_token = tokenizer.id_to_token(self.pad_id) or ""
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token=pad_token, length=self.max_length if self.pad_to_max_length else None)
        return tokenizer

    def tokenize(self, tokenizer, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` of ``prompts``, ``[B, T]`` int64 each, by a :meth:`configured`
        ``tokenizer``, special tokens added: what the pipeline's tokenizer call gives. A prompt that is not
        UTF-8 text, and a tokenizer whose rows come out of other lengths than the record's padding and
        truncation make (one whose template adds more special tokens than ``max_length``), are refused."""
        for p in prompts:
            if not isinstance(p, str) or not _is_utf8(p):
                raise DitqError(f"a prompt must be UTF-8 text, got {shown(p, 60)}")
        try:
            encoded = tokenizer.encode_batch(list(prompts))
        except Exception as e:  # the Rust library raises plain Exceptions
            raise DitqError(f"the tokenizer {self.tokenizer} cannot tokenize the prompt ({one_line(e, 200)})") from None
        lengths = sorted({len(e.ids) for e in encoded})
        longest = lengths[-1] if lengths else 0
        padded = longest == self.max_length if self.pad_to_max_length else (longest <= self.max_length or not self.truncation)
        if len(lengths) > 1 or not padded:
            raise DitqError(f"the tokenizer {self.tokenizer} gives prompts of {', '.join(map(str, lengths))} tokens; the text "
                            f"encoder {self.folder} takes {'exactly' if self.pad_to_max_length else 'at most'} {self.max_length}")  # fmt: skip
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        return ids, mask

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: every field, and the derived ``onnx`` and ``outputs`` for readers of the JSON."""
        return {"folder": self.folder, "kind": self.kind, "onnx": self.onnx, "outputs": list(self.outputs),
                "tokenizer": self.tokenizer, "max_length": self.max_length, "pad_id": self.pad_id,
                "attention_mask": self.attention_mask, "pad_to_max_length": self.pad_to_max_length,
                "truncation": self.truncation}  # fmt: skip

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> "TextEncoder":
        """The text encoder a record holds (untrusted), every field checked (:data:`TEXT_FIELDS`)."""
        rec = check_fields(obj, TEXT_FIELDS, where, required=("folder", "kind", "tokenizer", "max_length", "pad_id"))
        try:
            enc = cls(**{k: rec[k] for k in TEXT_FIELDS if k not in ("onnx", "outputs")})
        except DitqError as e:
            raise DitqError(f"{where}: {e}") from None
        if rec["onnx"] is not None and rec["onnx"] != enc.onnx:
            raise DitqError(f"{where}: onnx must be {enc.onnx!r} (the folder's name + .onnx), got {shown(rec['onnx'], 60)}")
        if rec["outputs"] is not None and tuple(rec["outputs"]) != enc.outputs:
            raise DitqError(f"{where}: outputs must be {list(enc.outputs)} for a {enc.kind} encoder, got {shown(rec['outputs'], 100)}")
        return enc


TEXT_FIELDS: dict[str, Any] = {
    "folder": Text(64),
    "kind": OneOf(tuple(TEXT_KINDS)),
    "onnx": Text(64, None, nullable=True),  # derived from folder: checked equal when present
    "outputs": ListOf(Text(64), 8, None),  # derived from kind: checked equal when present
    "tokenizer": Text(64),
    "max_length": Int(1, MAX_TEXT_TOKENS),
    "pad_id": Int(0, MAX_TOKEN_ID),
    "attention_mask": Bool(False),
    "pad_to_max_length": Bool(True),
    "truncation": Bool(True),
}


def _is_utf8(text: str) -> bool:
    """Whether ``text`` is UTF-8 encodable (no lone surrogates: a command line's undecodable bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


MAX_TOKENIZER_BYTES = 64 << 20  # a tokenizer's JSON: CLIP's 3.6 MB, T5's 2.4 MB


def parse_tokenizer(data: bytes | str, where: str):
    """A ``tokenizers.Tokenizer`` from its JSON (untrusted: a file ditq wrote, or a pipeline folder's);
    anything the library cannot read is one :class:`DitqError` naming ``where``."""
    from tokenizers import Tokenizer  # the sampling side's only tokenization dependency

    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return Tokenizer.from_str(text)
    except Exception as e:  # the Rust library raises plain Exceptions (and UnicodeDecodeError above)
        raise DitqError(f"{where}: not a tokenizers JSON ({one_line(e, 200)})") from None
