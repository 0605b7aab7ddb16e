"""Model families: what ditq needs to know about one diffusers transformer class, behind one interface.

A family is one module of this package: a :class:`FamilyAdapter` subclass for its diffusers class,
decorated with :func:`register`. The package imports every module it holds, so adding a family is adding
its file (and its tests); :func:`adapter_for` finds the adapter of a model, or of a class name read from a
``config.json``, and refuses any other class in one line naming the supported ones.

An adapter gives:

- the traced signature: ``input_names``, :meth:`~FamilyAdapter.example_inputs`,
  :meth:`~FamilyAdapter.dynamic_shapes` (the batch axis of every input) and
  :meth:`~FamilyAdapter.wrap`, the ``nn.Module`` the exporter traces, holding the model under the
  attribute ``root`` (the exporter's module paths start with ``root + "."``);
- :meth:`~FamilyAdapter.torch_callable`: the PyTorch model as a sampler callable over numpy arrays, with
  the signature of the exported graph (as :class:`ditq.runtime.session.OrtDiT`), so one loop drives both;
- :attr:`~FamilyAdapter.coverage`: which linears get what (:class:`Coverage`);
- :meth:`~FamilyAdapter.conditioning`: the class conditioning classifier-free guidance uses;
- :meth:`~FamilyAdapter.output_split`: the output's prediction channels and variance channels;
- :meth:`~FamilyAdapter.sample_shape`: the shape of one sample the model denoises.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Mapping

from ditq.errors import DitqError, shown
from ditq.families import FamilySpec
from ditq.pipeline import ClassConditioning


STREAMS = ("image", "text", "joint")  # the tokens a block linear's input holds (:attr:`InputGroup.stream`)


@dataclass(frozen=True)
class InputGroup:
    """The linears of one block that read the same input: they share one activation quantizer, one
    RobuQ sensitivity unit and one search gene (DiT's ``to_q``/``to_k``/``to_v``: Q-DiT's fused qkv)."""

    name: str  # the group's name inside its block ("attn1.qkv")
    members: tuple[str, ...]  # module names inside the block, in order
    stream: str = "image"  # which tokens its input holds: image, text (caption tokens) or joint (both, concatenated)

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError(f"input group {self.name!r} has no members")
        if self.stream not in STREAMS:
            raise ValueError(f"input group {self.name!r}: stream {self.stream!r} is not one of {STREAMS}")


@dataclass(frozen=True)
class BlockList:
    """A further list of repeated blocks with its own input groups (Flux's ``single_transformer_blocks``
    beside its ``transformer_blocks``)."""

    blocks: str
    activation_groups: tuple[InputGroup, ...]


@dataclass(frozen=True)
class Coverage:
    """Which linears of a family get what, as recipe ``match`` patterns over its torch module names.

    ============================  =========================================================================
    field                         Q-DiT (:meth:`ditq.recipe.Recipe.qdit`) / RobuQ (``Recipe.robuq``)
    ============================  =========================================================================
    ``activation_groups``         weights + input activations, in every block ``<blocks>.<i>.`` (and of
                                  every ``more_blocks`` list); grouped by the input they read
    ``float_linears``             float (not covered) in both
    ``robuq_activation_4bit``     RobuQ: ternary weights, 4-bit input activations (adaLN)
    ``robuq_weight_4bit``         RobuQ: 4-bit weight-only (class tables, final modulation)
    every other linear/table      weight-only
    ============================  =========================================================================
    """

    blocks: str  # the module list of the repeated blocks: block i's modules are "<blocks>.<i>.<name>"
    activation_groups: tuple[InputGroup, ...]
    float_linears: tuple[str, ...] = ()
    robuq_activation_4bit: tuple[str, ...] = ()
    robuq_weight_4bit: tuple[str, ...] = ()
    more_blocks: tuple[BlockList, ...] = ()

    @property
    def block_lists(self) -> tuple[BlockList, ...]:
        """Every list of repeated blocks with its input groups, ``blocks`` first."""
        return (BlockList(self.blocks, self.activation_groups), *self.more_blocks)

    @property
    def activation_linears(self) -> tuple[str, ...]:
        """The patterns of the block linears that get weights and activations, group by group."""
        return tuple(f"{bl.blocks}.*.{m}" for bl in self.block_lists for g in bl.activation_groups for m in g.members)

    def present_in(self, modules: Iterable[str]) -> "Coverage":
        """This coverage without the input groups that no block of a model with the module names
        ``modules`` holds (a family whose blocks differ: SD3.5's dual attention, absent from SD3), so that
        every rule a recipe builds from it selects a module of that model."""
        in_blocks: dict[str, set[str]] = {}  # block list -> the module names inside its blocks ("attn.to_q")
        for n in modules:
            for bl in self.block_lists:
                i, _, inner = n[len(bl.blocks) + 1 :].partition(".")
                if n.startswith(bl.blocks + ".") and i.isdigit():
                    in_blocks.setdefault(bl.blocks, set()).add(inner)

        def held(bl: BlockList, g: InputGroup) -> bool:
            return all(m in in_blocks.get(bl.blocks, ()) for m in g.members)

        lists = [replace(bl, activation_groups=tuple(g for g in bl.activation_groups if held(bl, g))) for bl in self.block_lists]
        return replace(self, activation_groups=lists[0].activation_groups, more_blocks=tuple(lists[1:]))

    def groups(self, linears: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """The input groups present among the module names ``linears``: ``"<blocks>.<i>.<group>" ->
        member module names``, list by list, block by block (ascending ``i``), in group order. A group is
        present when every one of its members is among ``linears``."""
        return {unit: members for unit, members, _ in self._present(linears)}

    def streams(self, linears: Iterable[str]) -> dict[str, str]:
        """The stream (:attr:`InputGroup.stream`) of each input group :meth:`groups` finds, by the same keys."""
        return {unit: g.stream for unit, _, g in self._present(linears)}

    def _present(self, linears: Iterable[str]) -> Iterator[tuple[str, tuple[str, ...], InputGroup]]:
        names = set(linears)
        for bl in self.block_lists:
            prefix = bl.blocks + "."
            blocks = sorted({int(i) for n in names if n.startswith(prefix) and (i := n[len(prefix) :].split(".")[0]).isdigit()})
            for b in blocks:
                for g in bl.activation_groups:
                    members = tuple(f"{prefix}{b}.{m}" for m in g.members)
                    if all(m in names for m in members):
                        yield f"{prefix}{b}.{g.name}", members, g


class FamilyAdapter:
    """One model family (one diffusers transformer class); see the module docstring. Subclasses set the
    class attributes and implement the methods that raise ``NotImplementedError``."""

    class_name: str = ""  # the diffusers class: the model's type name, ``_class_name`` in its config.json
    spec: FamilySpec  # the family's torch-free half (spec_for(class_name))
    coverage: Coverage
    root: str = "model"  # the attribute of :meth:`wrap`'s module that holds the model
    timestep_index: int = 1  # the position of the timestep among ``input_names``
    input_dtypes: tuple[str, ...] = ()  # numpy dtypes of the graph's inputs by position; float32 past the end
    # the repeated blocks a config counts: (the module list, the config field with its length)
    block_counts: tuple[tuple[str, str], ...] = (("transformer_blocks", "num_layers"),)

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.spec.input_names

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.spec.output_names

    def build(self, config: Mapping[str, Any], seed: int | None = 0) -> Any:
        """A float32 eval-mode model of the checked ``config`` (``spec.check_config``); random weights drawn
        from ``seed`` without touching the global RNG (None: the constructor's own draw)."""
        raise NotImplementedError

    def timestep_input(self, timesteps: list[int]) -> Any:
        """The timestep input (torch) for DDPM-unit timesteps ``0..999`` (validation's cases): what the
        family's pipeline passes at those points of its schedule."""
        raise NotImplementedError

    def check_weights(self, config: Mapping[str, Any], names: Iterable[str], where: str) -> None:
        """Refuse, in one line, weights (tensor ``names``) that do not fit ``config`` in a way the loader's
        missing/unexpected report would not say clearly: the blocks of each list of :attr:`block_counts`,
        said before a model of the config's count is built."""
        names = list(names)
        for blocks, field in self.block_counts:
            held = len({int(m.group(1)) for k in names if (m := re.match(rf"{re.escape(blocks)}\.(\d+)\.", k))})
            if held != config[field]:
                raise DitqError(f"{where}: config.json says {field} {config[field]}, the weights hold {held} "
                                f"block{'' if held == 1 else 's'} in {blocks}")  # fmt: skip

    def wrap(self, model) -> Any:
        """The ``nn.Module`` the exporter traces: ``input_names`` in, the model output out; the model is
        its attribute ``root``."""
        raise NotImplementedError

    def example_inputs(self, config: Mapping[str, Any], batch: int = 2, seed: int = 0) -> tuple[Any, ...]:
        """Seeded torch inputs of the traced signature, ``batch`` rows each."""
        raise NotImplementedError

    def serving_inputs(self, config: Mapping[str, Any], batch: int = 1, seed: int = 0) -> tuple[Any, ...]:
        """Seeded torch inputs at the sizes the family's pipeline runs the model at (image tokens of
        :meth:`~ditq.families.FamilySpec.sample_shape`, the pipeline's text length): what ``ditq bench``
        times. :meth:`example_inputs` where those are the traced sizes already."""
        return self.example_inputs(config, batch=batch, seed=seed)

    def dynamic_shapes(self, batch) -> tuple[dict[int, Any], ...]:
        """The dynamic axes of the traced inputs for ``torch.onnx.export``: axis 0 of every input is the
        batch ``batch`` (a ``torch.export.Dim``). One entry per ``input_names``; the tracer takes as many as
        :meth:`example_inputs` gives (a model without a trailing optional input)."""
        return tuple({0: batch} for _ in self.input_names)

    def coverage_of(self, model) -> Coverage:
        """:attr:`coverage` as ``model`` holds it (:meth:`Coverage.present_in`): what recipes are built from."""
        return self.coverage.present_in(name for name, _ in model.named_modules())

    def torch_callable(self, model) -> Callable[..., Any]:
        """``model`` as a sampler callable over numpy arrays in ``input_names`` order: :meth:`wrap` of it in
        eval mode, each array as its :attr:`input_dtypes` entry (:class:`TorchGraph`)."""
        return TorchGraph(self.wrap(model.eval()), self.input_dtypes)

    def conditioning(self, config: Mapping[str, Any]) -> ClassConditioning | None:
        """The class conditioning of a model of this ``config`` (its null label included); None: text."""
        return self.spec.conditioning(config)

    def output_split(self, config: Mapping[str, Any]) -> tuple[int, int]:
        """``(prediction channels, variance channels)`` of the output (variance 0: no learned sigma)."""
        return self.spec.output_split(config)

    def sample_shape(self, config: Mapping[str, Any]) -> tuple[int, ...]:
        """The shape of one sample the model denoises (no batch axis)."""
        return self.spec.sample_shape(config)


class TorchGraph:
    """A wrapped PyTorch model (:meth:`FamilyAdapter.wrap`: the float model or the quantized reference) as a
    callable over numpy arrays in the graph's input order, like :class:`ditq.runtime.session.OrtDiT`: each
    array converted to ``dtypes[i]`` (float32 past the end)."""

    def __init__(self, forward: Any, dtypes: tuple[str, ...] = ()):
        self.forward, self.dtypes = forward, dtypes

    def __call__(self, *arrays: Any) -> Any:
        import numpy as np
        import torch

        dtypes = (*self.dtypes, *("float32",) * (len(arrays) - len(self.dtypes)))
        with torch.no_grad():
            return self.forward(*(torch.from_numpy(np.ascontiguousarray(a, d)) for a, d in zip(arrays, dtypes))).numpy()


def build_seeded(cls, config: Mapping[str, Any], seed: int | None = 0):
    """``cls(**config)`` in float32 eval mode, its random weights drawn from ``seed`` without touching the
    global RNG (None: as the constructor draws them)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(**config)
    return model.float().eval()


_REGISTRY: dict[str, FamilyAdapter] = {}
DEFAULT_CLASS = "DiTTransformer2DModel"  # the family a recipe is written for when no model is given


def register(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Class decorator: make ``cls`` (an instance of it) the adapter of ``cls.class_name``."""
    if not cls.class_name:
        raise ValueError(f"{cls.__name__} names no class_name")
    if cls.class_name in _REGISTRY and type(_REGISTRY[cls.class_name]) is not cls:
        raise ValueError(f"{cls.class_name} already has the adapter {type(_REGISTRY[cls.class_name]).__name__}")
    _REGISTRY[cls.class_name] = cls()
    return cls


def supported() -> tuple[str, ...]:
    """The class names that have an adapter, sorted."""
    return tuple(sorted(_REGISTRY))


def adapter_for(model_or_class_name) -> FamilyAdapter:
    """The adapter of a model (by the name of its type, or else of the nearest base class in its method
    resolution order that has one: a subclass of a supported class is supported) or of a class name (a
    string, e.g. a config.json's ``_class_name``); any other class is refused in one line naming the
    supported ones."""
    if isinstance(model_or_class_name, str):
        names = [model_or_class_name]
    else:
        names = [c.__name__ for c in type(model_or_class_name).__mro__]
    for name in names:
        if name in _REGISTRY:
            return _REGISTRY[name]
    raise DitqError(f"unsupported architecture {shown(names[0])}; ditq supports: {', '.join(supported())}")


# every module of this package is a family: importing it registers its adapter
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
