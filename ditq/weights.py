"""Weights from files ditq does not trust, loaded into a model built from a checked config.

Reading: ``.safetensors`` with the safetensors library (its header is validated: length, JSON, dtypes,
offsets inside the file and not overlapping); anything else with ``torch.load(weights_only=True)``. A
pickle that asks for anything but tensors and containers of them is refused, never executed, and the
refusal names the global it asked for.

Loading (:func:`load_weights`): the model is first built on PyTorch's ``meta`` device (no memory, no
initialisation) to learn the name and shape of every parameter and buffer its ``state_dict`` holds.
The file's tensors must be exactly those: none missing, none left over, every shape equal, floating
point. Only then is the model built for real and the tensors copied in (``load_state_dict(strict=True)``),
so no parameter is ever left as initialised or uninitialised memory, and a config that asks for a large
model is refused before any memory is spent on it. Last, every value must be finite in float32.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

from ditq.errors import DitqError, one_line, shown
from ditq.untrusted import inside, read_json

SHOWN = 3  # names listed in a message, then a count

# diffusers' weight file names, in the order ``from_pretrained(use_safetensors=...)`` prefers them
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # a transformers model folder's (text encoders)


def read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _not_empty(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DitqError(f"{path}: corrupt safetensors file ({one_line(e, 200)})") from None


def read_pickle(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and containers of them, nothing else."""
    import torch

    _not_empty(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: the error says it all
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DitqError(f"{path}: refused to load: {unpickling_refusal(e)}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, UnicodeDecodeError, IndexError) as e:
        raise DitqError(f"{path}: corrupt or unreadable checkpoint ({one_line(e, 200)})") from None


def unpickling_refusal(e: BaseException) -> str:
    """Why torch's weights-only unpickler refused a file, in one clause: the global it asked for, else the
    unpickler's own reason (torch's advice around it, which suggests turning the protection off, is dropped)."""
    text = str(e)
    if m := re.search(r"GLOBAL (\S+)", text):
        why = f"the pickle asks for the global {shown(m.group(1))}"
    elif m := re.search(r"Unsupported operand (\d+)", text):
        why = f"the pickle uses opcode {m.group(1)}, which a pickle of tensors does not (or the file is corrupt)"
    elif m := re.search(r"but got ([^\n]+?)\.?$", text, re.M):
        why = f"the pickle builds {shown(m.group(1))}"
    else:
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        inner = next((p for p in reversed(paragraphs) if "weights_only" not in p and not p.startswith("Check the documentation")), "")
        why = f"the pickle holds something else ({one_line(inner, 120)})" if inner else "the pickle holds something else"
    return f"{why}, and a checkpoint may hold only tensors (and dicts or lists of them); nothing in the file was run"


def read_tensors(path: Path) -> dict[str, Any]:
    """The tensors of one weights file, by name (safetensors, else a weights-only pickle of a flat dict)."""
    import torch

    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = read_pickle(path)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise DitqError(f"{path}: not a state dict of tensors")
    return obj


def diffusers_weight_files(folder: Path, names: tuple[str, ...] = WEIGHT_FILES) -> list[Path]:
    """The weights of a diffusers model folder: ``diffusion_pytorch_model.safetensors`` (else ``.bin``),
    or the shards a ``*.index.json`` names (each one inside the folder). ``names``: the file names to look
    for, in order of preference (a transformers model folder's: :data:`TRANSFORMERS_WEIGHT_FILES`)."""
    for name in names:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise DitqError(f"{index}: weight_map must be a non-empty object of tensor name -> file name")
            shards = [inside(folder, s, f"{index}: weight_map", links_may_leave=True) for s in sorted(set(map(str, weight_map.values())))]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise DitqError(f"{index}: names shard {shown(missing[0])}, which is not a file in {folder}")
            return shards
    raise DitqError(f"{folder}: no weights file ({' or '.join(names)})")


def read_weight_files(files: list[Path]) -> dict[str, Any]:
    tensors: dict[str, Any] = {}
    for f in files:
        part = read_tensors(f)
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise DitqError(f"{f}: tensor {shown(twice[0])} is also in another shard")
        if not part:
            raise DitqError(f"{f}: holds no tensors")
        tensors.update(part)
    return tensors


def expected_tensors(build: Callable[[], Any]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(name -> shape of every entry of the model's ``state_dict``, names of its non-persistent buffers),
    from a model built on the ``meta`` device."""
    import torch

    with torch.device("meta"):
        model = build()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    transient = {n for n, _ in model.named_buffers()} - set(shapes)
    return shapes, transient


def check_tensors(tensors: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str, *, ignore: set[str] = frozenset()) -> None:
    """Refuse ``tensors`` unless they are exactly ``shapes`` (``ignore``: names that may be present too)
    and floating point; the message names the first few offending tensors and counts them."""
    missing = [k for k in shapes if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in shapes and k not in ignore)
    reshaped = [k for k in shapes if k in tensors and tuple(tensors[k].shape) != shapes[k]]
    problems = []
    if missing:
        problems.append(f"missing {tensor_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {tensor_names(unexpected)}")
    if reshaped:
        k = reshaped[0]
        problems.append(f"another shape in {tensor_names(reshaped)}: {shown(k)} is {list(tensors[k].shape)}, the config needs {list(shapes[k])}")
    if problems:
        raise DitqError(f"{where}: the weights do not fit the model's config: " + "; ".join(problems))
    not_float = [k for k in shapes if not tensors[k].is_floating_point()]
    if not_float:
        raise DitqError(f"{where}: not floating point: {tensor_names(not_float)}; {shown(not_float[0])} is {tensors[not_float[0]].dtype}")


def check_finite(tensors: dict[str, Any], where: str) -> None:
    """Refuse NaN or Inf in any of ``tensors``, naming them."""
    import torch

    # max |t| is NaN or Inf exactly when t holds a NaN or an Inf (torch's max propagates NaN); it runs far
    # faster than an elementwise isfinite on a busy CPU
    bad = [k for k, t in tensors.items() if t.numel() and not bool(torch.isfinite(t.abs().amax()))]
    if bad:
        t = tensors[bad[0]]
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise DitqError(f"{where}: NaN or Inf values in {tensor_names(bad)}; {shown(bad[0])} holds {nan} NaN and {inf} Inf")


def load_weights(build: Callable[[], Any], tensors: dict[str, Any], where: str) -> Any:
    """``build()`` with ``tensors`` loaded, after :func:`check_tensors` against its meta-device twin;
    float32, eval mode, every loaded value finite (checked in float32: a float64 value beyond float32's
    range is refused too)."""
    try:
        shapes, transient = expected_tensors(build)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError, RuntimeError, ZeroDivisionError) as e:
        raise DitqError(f"{where}: its config does not describe a model diffusers can build ({one_line(e, 200)})") from None
    check_tensors(tensors, shapes, where, ignore=transient)
    model = build().float()
    model.load_state_dict({k: tensors[k] for k in shapes}, strict=True)
    state = model.state_dict()
    check_finite({k: state[k] for k in shapes}, where)
    return model.eval()


def tensor_names(names: list[str]) -> str:
    listed = ", ".join(shown(n) for n in names[:SHOWN])
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} ({listed}{more})"


def _not_empty(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DitqError(f"{path}: cannot read ({e.strerror or e})") from None
    if size == 0:
        raise DitqError(f"{path}: empty file (0 bytes)")
