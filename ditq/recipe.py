"""The quantization recipe: what every linear (and embedding table) of a DiT gets.

One versioned JSON document::

    {
      "format": "ditq-recipe", "version": 1, "method": "rtn",
      "default": {"wbits": 4, "abits": null, "group_size": 64, "symmetric": false},
      "rules": [
        {"match": "transformer_blocks.*.attn1.to_[qkv]", "abits": 8},
        {"match": "proj_out_2", "wbits": null}
      ]
    }

Every ``nn.Linear`` and ``nn.Embedding`` of the model starts from ``default``; the ``rules`` are applied
in order, each overriding the fields it names for the modules its ``match`` selects (an ``fnmatch``
glob over the torch module name, or a regular expression written ``"re:<pattern>"`` that must match the
whole name). A rule that selects no module is an error (it is almost always a typo).

Recipes are user input: see :mod:`ditq.patterns` for how a ``match`` is read (regular expressions by
RE2, in time linear in the name).

Fields of a layer's configuration:

- ``wbits``: weight bits 2..8, ``1.58`` for ternary weights (RobuQ: codes {-1, 0, +1}, scale = mean |w|
  of each row and group, stored as 2-bit codes), or ``null`` for a float layer (not covered);
- ``abits``: bits of the layer's *input* activation (1..8), quantized dynamically per token and group at
  every forward, or ``null`` for float activations (weight-only). Ignored for embedding tables;
- ``group_size``: consecutive input channels sharing one scale, for the weight rows and the activation
  tokens alike (Q-DiT); ``null`` means the whole input width (per channel / per token). It must divide
  the layer's input width;
- ``symmetric``: signed codes with zero point 0 instead of Q-DiT's asymmetric min-max (the default);
  ternary weights are always symmetric;
- ``rotate``: Hadamard-rotate the layer (RobuQ): the input is multiplied online, in the graph, by a block
  Hadamard matrix before it is quantized, and the weight offline by the same matrix, so the float layer is
  unchanged (``x W^T = (x H)(W H)^T``) while outlier channels are spread before quantization.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from ditq.errors import DitqError, shown
from ditq.patterns import NamePattern
from ditq.untrusted import parse_json, read_json

RECIPE_FORMAT = "ditq-recipe"
RECIPE_VERSION = 1
# the largest recipe file or ``ditq.recipe`` metadata read: a recipe with one rule for every linear of
# DiT-XL/2 (28 blocks x 7 linears) is 25 kB, so 16 MiB is generous and still bounds the parse
MAX_RECIPE_BYTES = 16 << 20
METHODS = ("rtn", "gptq")  # how integer weights are found: round to nearest, or GPTQ on calibration data
BITS_RANGE = range(2, 9)  # weight bits (plus TERNARY)
ABITS_RANGE = range(1, 9)  # activation bits (RobuQ's mixed precision gives insensitive layers 1 bit)
TERNARY = 1.58
AUTO_GROUP = "auto"  # ``--group-size auto``: resolved per model by :func:`auto_group_size`
AUTO_GROUP_CANDIDATES = (128, 64, 32, 16)  # Q-DiT's default first


@dataclass(frozen=True)
class LayerQuant:
    """How one layer is quantized (see the module docstring for the meaning of each field)."""

    wbits: int | None = 4
    abits: int | None = None
    group_size: int | None = 128
    symmetric: bool = False
    rotate: bool = False

    def __post_init__(self) -> None:
        w, a = self.wbits, self.abits
        if w is not None and w != TERNARY and (not isinstance(w, int) or isinstance(w, bool) or w not in BITS_RANGE):
            raise DitqError(f"wbits must be an integer in 2..8, 1.58 (ternary) or null, got {shown(w)}")
        if a is not None and (not isinstance(a, int) or isinstance(a, bool) or a not in ABITS_RANGE):
            raise DitqError(f"abits must be an integer in 1..8 or null, got {shown(a)}")
        if w == TERNARY and not self.symmetric:
            raise DitqError("ternary weights (wbits 1.58) are symmetric: set symmetric to true")
        if not isinstance(self.rotate, bool):
            raise DitqError(f"rotate must be true or false, got {shown(self.rotate)}")
        g = self.group_size
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
            raise DitqError(f"group_size must be a positive integer or null, got {shown(g)}")
        if not isinstance(self.symmetric, bool):
            raise DitqError(f"symmetric must be true or false, got {shown(self.symmetric)}")

    @property
    def covered(self) -> bool:
        return self.wbits is not None

    @property
    def ternary(self) -> bool:
        return self.wbits == TERNARY

    @property
    def code_bits(self) -> int:
        """Bits of the stored integer codes (ternary codes take 2)."""
        return 2 if self.ternary else int(self.wbits)

    def tag(self) -> str:
        a = "16" if self.abits is None else str(self.abits)
        g = "ch" if self.group_size is None else str(self.group_size)
        return f"W{self.wbits}A{a}g{g}" + ("s" if self.symmetric else "") + ("h" if self.rotate else "")


_LAYER_KEYS = {f.name for f in fields(LayerQuant)}


@dataclass(frozen=True)
class Rule:
    """Override ``values`` for every module whose name ``match`` selects."""

    match: str
    values: Mapping[str, Any] = field(default_factory=dict)
    _pattern: NamePattern | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pattern", NamePattern(self.match))  # checks the match first
        if not isinstance(self.values, Mapping):
            raise DitqError(f"recipe rule {shown(self.match)}: values must be a mapping, got {shown(self.values)}")
        bad = set(self.values) - _LAYER_KEYS
        if bad:
            bad = shown(sorted(map(str, bad)))
            raise DitqError(f"recipe rule {shown(self.match)}: unknown field(s) {bad}; allowed {sorted(_LAYER_KEYS)}")
        try:
            replace(LayerQuant(), **self.values)  # validates the values now, not when the rule first applies
        except DitqError as e:
            raise DitqError(f"recipe rule {shown(self.match)}: {e}") from None

    def selects(self, name: str) -> bool:
        return self._pattern.selects(name)


@dataclass(frozen=True)
class LayerPlan:
    """A covered module as the exporter sees it: kind, shape and configuration."""

    name: str
    kind: str  # "linear" | "embedding"
    in_features: int  # K: the grouped axis (embedding: the embedding width)
    out_features: int  # N (embedding: the number of rows)
    quant: LayerQuant
    # How the layer runs. "qdq": the recipe's arithmetic as standard QuantizeLinear/DequantizeLinear.
    # A fast-kernel lowering (target ``ort``, see ditq.graphs.lower_ort) may quantize the input activation
    # differently from the weight grouping: ``act_group``/``act_symmetric`` then say how (None: as the weight).
    kernel: str = "qdq"
    act_group: int | None = None
    act_symmetric: bool | None = None

    @property
    def group_size(self) -> int:
        return self.quant.group_size or self.in_features

    @property
    def abits(self) -> int | None:
        return self.quant.abits if self.kind == "linear" else None

    @property
    def activation_group(self) -> int:
        return self.act_group or self.group_size

    @property
    def activation_symmetric(self) -> bool:
        """Ternary layers quantize their input asymmetric min-max (2 bits: 4 levels, not 3; 1 bit exists)."""
        if self.act_symmetric is not None:
            return self.act_symmetric
        return self.quant.symmetric and not self.quant.ternary

    @property
    def rotation(self) -> int | None:
        """Block size of the layer's Hadamard rotation, or None."""
        if not self.quant.rotate or self.kind != "linear":
            return None
        return rotation_block(self.in_features)


MAX_ROTATION = 128  # largest Hadamard block (1152 -> 128, 4608 -> 128, 192 -> 64): a b x b fp32 constant each


def rotation_block(width: int) -> int:
    """The Hadamard block size for a width: its largest power-of-two divisor, at most :data:`MAX_ROTATION`."""
    return min(width & -width, MAX_ROTATION)


@dataclass(frozen=True)
class Recipe:
    """A default layer configuration plus ordered per-module overrides."""

    default: LayerQuant = field(default_factory=LayerQuant)
    rules: tuple[Rule, ...] = ()
    method: str = "rtn"
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DitqError(f"recipe method {shown(self.method)} is not supported; choose from {list(METHODS)}")
        if self.version != RECIPE_VERSION:
            raise DitqError(f"recipe version {shown(self.version)} is not supported (this ditq reads version {RECIPE_VERSION})")

    # ------------------------------------------------------------------ builders
    # ``coverage``: the model family's :class:`ditq.adapters.Coverage` (``adapter_for(model).coverage``),
    # which names the layers; the builders only say what each kind of layer gets.
    @classmethod
    def qdit(
        cls, coverage, wbits: int = 4, abits: int | None = 8, group_size: int | None = 128, symmetric: bool = False
    ) -> "Recipe":
        """Q-DiT coverage: W+A on the coverage's block linears (DiT: qkv/proj/fc1/fc2 of every block);
        every other linear and the class embedding tables weight-only (so the file really shrinks); the
        coverage's float linears (the final projection) float."""
        rules = [Rule(p, {"abits": abits}) for p in coverage.activation_linears]
        rules += [Rule(p, {"wbits": None}) for p in coverage.float_linears]
        return cls(LayerQuant(wbits, None, group_size, symmetric), tuple(rules))

    @classmethod
    def robuq(
        cls, coverage, abits: int = 4, rotate: bool = True, act_bits: Mapping[str, int] | None = None
    ) -> "Recipe":
        """RobuQ coverage: ternary weights per output channel everywhere ("weights stay ternary
        everywhere"); per-token ``abits`` activations on the coverage's block linears (DiT: qkv/proj/fc1/fc2
        of every block) and 4-bit ones on its ``robuq_activation_4bit`` layers (adaLN), all
        Hadamard-rotated when ``rotate``; other linears (the timestep MLPs) weight-only ternary; the
        ``robuq_weight_4bit`` layers (the class tables and the final layer's modulation) 4-bit weight-only;
        the float linears float. The paper keeps adaLN at W4 and the embedders float, which on a small model
        is most of the file (the digits DiT's adaLN alone is 29% of its weights). ``act_bits``: per-module
        activation bits (mixed precision)."""
        block = {"abits": abits, "rotate": rotate}
        rules = [Rule(p, block) for p in coverage.activation_linears]
        rules += [Rule(p, {"abits": 4, "rotate": rotate}) for p in coverage.robuq_activation_4bit]
        rules += [Rule(p, {"wbits": 4, "symmetric": False}) for p in coverage.robuq_weight_4bit]
        rules += [Rule(p, {"wbits": None}) for p in coverage.float_linears]
        rules += [Rule(name, {"abits": int(b)}) for name, b in (act_bits or {}).items()]
        return cls(LayerQuant(TERNARY, None, None, True), tuple(rules))

    # ------------------------------------------------------------------ resolution
    def config_for(self, name: str) -> LayerQuant:
        cfg = self.default
        for rule in self.rules:
            if rule.selects(name):
                try:
                    cfg = replace(cfg, **rule.values)
                except TypeError as e:  # pragma: no cover - guarded by Rule.__post_init__
                    raise DitqError(f"recipe rule {shown(rule.match)}: {e}") from None
        return cfg

    def resolve(self, model) -> dict[str, LayerPlan]:
        """The covered modules of ``model`` with their configuration, checked against their shapes."""
        import torch.nn as nn

        names = []
        plans: dict[str, LayerPlan] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                kind, k, n = "linear", mod.in_features, mod.out_features
            elif isinstance(mod, nn.Embedding):
                kind, k, n = "embedding", mod.embedding_dim, mod.num_embeddings
            else:
                continue
            names.append(name)
            cfg = self.config_for(name)
            if not cfg.covered:
                continue
            g = cfg.group_size or k
            if k % g:
                raise DitqError(
                    f"group size {g} does not divide the input width {k} of layer {name!r}; "
                    f"choose a divisor of {k} or override it for this layer in the recipe"
                )
            plans[name] = LayerPlan(name, kind, k, n, cfg)
        for rule in self.rules:
            if not any(rule.selects(n) for n in names):
                raise DitqError(f"recipe rule {shown(rule.match)} selects no linear or embedding of this model")
        return plans

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECIPE_FORMAT,
            "version": self.version,
            "method": self.method,
            "default": asdict(self.default),
            "rules": [{"match": r.match, **dict(r.values)} for r in self.rules],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Any) -> "Recipe":
        if not isinstance(d, dict):
            raise DitqError("recipe must be a JSON object")
        if d.get("format") != RECIPE_FORMAT:
            raise DitqError(f"not a ditq recipe: 'format' must be {RECIPE_FORMAT!r}, got {shown(d.get('format'))}")
        unknown = set(d) - {"format", "version", "method", "default", "rules"}
        if unknown:
            raise DitqError(f"recipe: unknown key(s) {shown(sorted(unknown))}")
        default = d.get("default", {})
        if not isinstance(default, dict) or set(default) - _LAYER_KEYS:
            raise DitqError(f"recipe 'default' must be an object with keys among {sorted(_LAYER_KEYS)}")
        rules_in = d.get("rules", [])
        if not isinstance(rules_in, list):
            raise DitqError("recipe 'rules' must be a list")
        rules = []
        for i, r in enumerate(rules_in):
            if not isinstance(r, dict) or not isinstance(r.get("match"), str):
                raise DitqError(f"recipe rule #{i} must be an object with a string 'match'")
            rules.append(Rule(r["match"], {k: v for k, v in r.items() if k != "match"}))
        return cls(LayerQuant(**default), tuple(rules), d.get("method", "rtn"), d.get("version", RECIPE_VERSION))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Recipe":
        """The recipe in JSON ``text`` (bounded: :data:`MAX_RECIPE_BYTES`, see :func:`~ditq.untrusted.parse_json`)."""
        return cls.from_dict(parse_json(text, "recipe", max_bytes=MAX_RECIPE_BYTES))

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """The recipe in the file ``path``: a regular file (never a FIFO) of at most :data:`MAX_RECIPE_BYTES`."""
        p = Path(path)
        if not p.is_file():
            raise DitqError(f"recipe file not found: {p}")
        doc = read_json(p, str(p), max_bytes=MAX_RECIPE_BYTES)  # its errors name the file
        try:
            return cls.from_dict(doc)
        except DitqError as e:
            raise DitqError(f"{p}: {e}") from None


def auto_group_size(model, make_recipe, candidates: tuple[int, ...] = AUTO_GROUP_CANDIDATES) -> int:
    """The first group size of ``candidates`` (128, then 64, 32, 16) whose recipe ``make_recipe(g)``
    every covered layer of ``model`` takes (128 for the DiT presets; 64 for the digits DiT, whose width 192
    128 does not divide). When none fits, the error is 128's, naming the layer and its width."""
    first = None
    for g in candidates:
        try:
            make_recipe(g).resolve(model)
            return g
        except DitqError as e:
            first = first or e
    raise DitqError(f"{first}; no group size of {', '.join(map(str, candidates))} fits (--group-size auto)")
