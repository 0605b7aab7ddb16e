"""Reading what ditq does not trust: files a model folder names, JSON, and the fields in it.

Nothing in a checkpoint, a diffusers folder or an exported model is trusted:

- **Paths** a folder names (a sharded checkpoint's ``weight_map``, a pipeline's decoder) go through
  :func:`inside` before anything is opened: the same rules ONNX and ONNX Runtime apply to external
  data. A name must be relative, without ``..``, and (for folders ditq wrote) must not reach out of the
  folder through a symbolic link.
- **JSON** (``config.json``, model metadata, recipes, manifests, journal lines) is parsed by
  :func:`parse_json` with bounds on its size (:data:`MAX_JSON_BYTES` unless the caller gives another),
  nesting (:data:`MAX_JSON_DEPTH`) and integer length (Python's 4300 digits); a file is read by
  :func:`read_regular` / :func:`read_json`, which open only a regular file (never a FIFO or a device,
  whose reading could block) and read at most the bound.
- **Fields** are checked against small typed schemas (:data:`DIT_CONFIG`, :func:`check_source`;
  :data:`ditq.pipeline.FIELDS`): a JSON integer where a count is expected (never a float, string or boolean),
  finite numbers in a closed range, one of listed strings. Every failure is one :class:`DitqError`
  naming the file and the field.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from ditq.errors import DitqError, one_line, shown
from ditq.options import is_finite_real

MAX_VALUE = 1e30  # a bound of a value range (a pipeline's value_range)
MAX_SCALING_FACTOR = 1e6  # a VAE's latent scaling factor

MAX_JSON_BYTES = 1 << 20  # a config or metadata entry; real ones are under 2 kB
MAX_JSON_DEPTH = 32  # nesting levels of objects and arrays; real configs use 2


# ---------------------------------------------------------------------------------------------- paths
def inside(folder: str | Path, name: Any, what: str, *, links_may_leave: bool = False, plain: bool = False) -> Path:
    """``folder / name`` when ``name`` is a relative path that stays inside ``folder``; checked before
    anything is opened. ``links_may_leave`` allows symbolic links out of the folder (a Hugging Face
    cache snapshot links every file to its blob store); names with ``..`` or absolute are refused always.
    ``plain``: ``name`` must be a bare file name of ``folder`` (no ``/`` or ``\\``, not ``.``)."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise DitqError(f"{what}: expected a file name inside {folder}, got {shown(name, kinds=True)}")
    if plain and ("/" in name or "\\" in name or name in (".", "..")):
        raise DitqError(f"{what}: {shown(name)} is not a plain file name of {folder}")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(name).drive:
        raise DitqError(f"{what}: {shown(name)} is an absolute path; a model folder may only name files inside itself")
    if ".." in pure.parts:
        raise DitqError(f"{what}: {shown(name)} leads out of {folder} (..); a model folder may only name files inside itself")
    path = folder / name
    if not links_may_leave:
        try:
            root, real = folder.resolve(), path.resolve()
        except (OSError, RuntimeError):  # a loop of symbolic links
            raise DitqError(f"{what}: {shown(name)} cannot be resolved (a loop of symbolic links?)") from None
        if not real.is_relative_to(root):
            raise DitqError(f"{what}: {shown(name)} is a symbolic link out of {folder}; a model folder may only name files inside itself")
    return path


# ----------------------------------------------------------------------------------------------- JSON
class JsonError(DitqError):
    """What :func:`read_regular` or :func:`parse_json` refused; ``reason`` is the message without ``what``,
    ``kind`` the rule, for a caller that words it its own way. Reading: ``missing``, ``not-regular`` (a
    FIFO, device, folder, or a link not followed), ``unreadable``, ``size``; parsing: ``size`` and the
    :data:`NOT_JSON` kinds (not UTF-8, not JSON, an integer of over 4300 digits, nested too deeply, NaN or
    Infinity); ``type``: not an object."""

    def __init__(self, what: str, kind: str, reason: str):
        super().__init__(f"{what}: {reason}")
        self.kind, self.reason = kind, reason


NOT_JSON = ("utf8", "syntax", "digits", "nesting", "constant")  # the text is not JSON ditq reads


def parse_json(
    text: str | bytes, what: str, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH, allow_nan: bool = True
) -> Any:
    """The JSON value of ``text``, or one :class:`JsonError` naming ``what``: too large, not UTF-8, not
    JSON, an integer of more than 4300 digits, nested deeper than ``max_depth``, or (without
    ``allow_nan``) holding ``NaN``, ``Infinity`` or ``-Infinity``."""
    if len(text) > max_bytes:
        raise JsonError(what, "size", f"{len(text)} bytes of JSON, more than the {max_bytes} allowed")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JsonError(what, "utf8", f"not UTF-8 text (byte {e.start})") from None
    try:
        value = json.loads(text, parse_constant=None if allow_nan else _refuse_constant)
    except RecursionError:
        raise JsonError(what, "nesting", "JSON nested too deeply") from None
    except _NonFinite as e:
        raise JsonError(what, "constant", f"holds {e} (not a finite number)") from None
    except ValueError as e:  # JSONDecodeError, and integers beyond Python's conversion limit
        if "integer string conversion" in str(e):
            raise JsonError(what, "digits", "not valid JSON (an integer with too many digits)") from None
        raise JsonError(what, "syntax", f"not valid JSON ({one_line(e, 100)})") from None
    if _depth(value) > max_depth:
        raise JsonError(what, "nesting", f"JSON nested deeper than {max_depth} levels")
    return value


def parse_json_object(text: str | bytes, what: str, *, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """:func:`parse_json`, which must give an object."""
    value = parse_json(text, what, max_bytes=max_bytes)
    if not isinstance(value, dict):
        raise JsonError(what, "type", f"expected a JSON object, got {shown(value, kinds=True)}")
    return value


def read_regular(path: str | Path, what: str | None = None, *, max_bytes: int = MAX_JSON_BYTES, follow_links: bool = True) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` (more is a :class:`JsonError`): never a
    FIFO or a device (reading one could block), nor, unless ``follow_links``, a symbolic link."""
    path = Path(path)
    what = what or str(path)
    try:
        with open(path, "rb", opener=functools.partial(_open_regular, nofollow=0 if follow_links else os.O_NOFOLLOW)) as f:
            data = f.read(max_bytes + 1)
    except _NotRegular:
        raise JsonError(what, "not-regular", "cannot read (not a regular file)") from None
    except OSError as e:
        raise JsonError(what, "missing" if e.errno == errno.ENOENT else "unreadable", f"cannot read ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise JsonError(what, "size", f"more than the {max_bytes} bytes allowed")
    return data


def read_json(path: str | Path, what: str | None = None, *, max_bytes: int = MAX_JSON_BYTES, follow_links: bool = True) -> dict[str, Any]:
    """The JSON object in the regular file ``path`` (:func:`read_regular`, :func:`parse_json_object`)."""
    what = what or str(path)
    return parse_json_object(read_regular(path, what, max_bytes=max_bytes, follow_links=follow_links), what, max_bytes=max_bytes)


def regular_size(path: str | Path) -> int | None:
    """The size of ``path`` if it is a regular file (a symbolic link is not followed), else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


class _NotRegular(OSError):
    pass


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str):
    raise _NonFinite(name)


def _open_regular(path: str, flags: int, nofollow: int = 0) -> int:
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | nofollow)
    except OSError as e:
        if nofollow and e.errno == errno.ELOOP:  # the name is a symbolic link
            raise _NotRegular(0, "not a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _NotRegular(0, "not a regular file")
    return fd


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


# --------------------------------------------------------------------------------------------- fields
@dataclass(frozen=True)
class Int:
    """A JSON integer in ``lo..hi`` (``null`` too when ``nullable``)."""

    lo: int
    hi: int
    default: Any = None
    nullable: bool = False

    def check(self, value: Any, field: str, where: str) -> Any:
        if type(value) is not int or not self.lo <= value <= self.hi:
            raise _bad(where, field, f"an integer in {self.lo}..{self.hi}" + (" or null" if self.nullable else ""), value)
        return value


@dataclass(frozen=True)
class Float:
    """A finite JSON number in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""

    lo: float
    hi: float
    default: Any = None
    open_lo: bool = False
    nullable: bool = False

    def check(self, value: Any, field: str, where: str) -> Any:
        ok = isinstance(value, (int, float)) and is_finite_real(value)
        if ok:
            value = float(value)
            ok = (self.lo < value if self.open_lo else self.lo <= value) and value <= self.hi
        if not ok:
            span = f"{'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}]"
            raise _bad(where, field, f"a finite number in {span}", value)
        return value


@dataclass(frozen=True)
class Bool:
    """A JSON ``true`` or ``false`` (``null`` too when ``nullable``)."""

    default: Any
    nullable: bool = False

    def check(self, value: Any, field: str, where: str) -> bool:
        if not isinstance(value, bool):
            raise _bad(where, field, "true or false" + (" or null" if self.nullable else ""), value)
        return value


@dataclass(frozen=True)
class OneOf:
    """One of ``choices`` (strings, or ``None`` for ``null``)."""

    choices: tuple
    default: Any = None

    def check(self, value: Any, field: str, where: str) -> Any:
        if not (value is None or isinstance(value, str)) or value not in self.choices:
            raise _bad(where, field, "one of " + ", ".join(json.dumps(c) for c in self.choices), value)
        return value


@dataclass(frozen=True)
class Text:
    """A non-empty string of at most ``max_len`` characters (``null`` too when ``nullable``)."""

    max_len: int = 4096
    default: Any = None
    nullable: bool = False

    def check(self, value: Any, field: str, where: str) -> Any:
        if not isinstance(value, str) or not 0 < len(value) <= self.max_len or "\x00" in value:
            raise _bad(where, field, f"a string of 1..{self.max_len} characters", value)
        return value


@dataclass(frozen=True)
class Pair:
    """Two finite JSON numbers ``[lo, hi]`` with ``lo < hi``."""

    default: Any = None

    def check(self, value: Any, field: str, where: str) -> Any:
        if not (isinstance(value, list) and len(value) == 2):
            raise _bad(where, field, "two finite numbers [lo, hi] with lo < hi", value)
        lo, hi = (Float(-MAX_VALUE, MAX_VALUE).check(v, field, where) for v in value)
        if not lo < hi:
            raise _bad(where, field, "two finite numbers [lo, hi] with lo < hi", value)
        return [lo, hi]


@dataclass(frozen=True)
class Object:
    """A JSON object (``null`` too when ``nullable``: :func:`check_fields` lets ``null`` through for every
    field type that has the flag); its own fields are checked by whoever reads it."""

    default: Any = None
    nullable: bool = True

    def check(self, value: Any, field: str, where: str) -> Any:
        if not isinstance(value, dict):
            raise _bad(where, field, "a JSON object", value)
        return value


@dataclass(frozen=True)
class ListOf:
    """A JSON array of 1..``max_len`` items, each checked by ``item``."""

    item: Any
    max_len: int
    default: Any = None

    def check(self, value: Any, field: str, where: str) -> Any:
        if not isinstance(value, list) or not 0 < len(value) <= self.max_len:
            raise _bad(where, field, f"an array of 1..{self.max_len} items", value)
        return [self.item.check(v, f"{field}[{i}]", where) for i, v in enumerate(value)]


def _bad(where: str, field: str, takes: str, value: Any) -> DitqError:
    return DitqError(f"{where}: {field} must be {takes}, got {shown(value, kinds=True)}")


def check_fields(obj: Any, schema: dict[str, Any], where: str, *, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``obj`` (a JSON object) with every field of ``schema`` checked; an absent field takes the schema's
    default (an absent ``required`` one is an error). Fields the schema does not name are kept as they are."""
    if not isinstance(obj, dict):
        raise DitqError(f"{where}: expected a JSON object, got {shown(obj, kinds=True)}")
    out = dict(obj)
    for name, spec in schema.items():
        if name not in obj:
            if name in required:
                raise DitqError(f"{where}: {name} is missing")
            out[name] = spec.default
        elif obj[name] is None and getattr(spec, "nullable", False):  # every field type's ``null`` rule
            out[name] = None
        else:
            out[name] = spec.check(obj[name], name, where)
    return out


# ------------------------------------------------------------------------------------------- schemas
# The keyword arguments of diffusers' DiTTransformer2DModel, with its defaults: what config.json and an
# exported model's ``ditq.model_config`` may say. The bounds are far beyond any published DiT
# (DiT-XL/2: 16 heads of 72, 28 layers) and keep a hostile config from asking for an absurd model.
DIT_CONFIG: dict[str, Any] = {
    "num_attention_heads": Int(1, 256, 16),
    "attention_head_dim": Int(1, 1024, 72),
    "in_channels": Int(1, 1024, 4),
    "out_channels": Int(1, 1024, None, nullable=True),
    "num_layers": Int(1, 512, 28),
    "dropout": Float(0.0, 1.0, 0.0),
    "norm_num_groups": Int(1, 1024, 32),
    "attention_bias": Bool(True),
    "sample_size": Int(1, 1024, 32),
    "patch_size": Int(1, 64, 2),
    "activation_fn": OneOf(("gelu", "gelu-approximate", "geglu", "geglu-approximate", "swiglu", "linear-silu"), "gelu-approximate"),
    "num_embeds_ada_norm": Int(1, 1_000_000, 1000),  # ada_norm_zero embeds the class: never null
    "upcast_attention": Bool(False),
    "norm_type": OneOf(("ada_norm_zero",), "ada_norm_zero"),
    "norm_elementwise_affine": Bool(False),
    "norm_eps": Float(0.0, 1.0, 1e-5, open_lo=True),
}
MAX_HIDDEN = 16384  # num_attention_heads * attention_head_dim


def check_dit_config(obj: Any, where: str) -> dict[str, Any]:
    """The ``DiTTransformer2DModel`` keyword arguments of a config object (other keys dropped), every
    field checked against :data:`DIT_CONFIG`, and the fields consistent with each other."""
    cfg = check_fields(obj, DIT_CONFIG, where)
    cfg = {k: cfg[k] for k in DIT_CONFIG}
    check_width(cfg, where)
    return cfg


def check_width(cfg: dict[str, Any], where: str, *, grid: bool = True) -> int:
    """The blocks' width ``num_attention_heads x attention_head_dim`` of a checked config, at most
    :data:`MAX_HIDDEN`; with ``grid`` (a 2-D sin-cos position table over ``patch_size`` patches: DiT,
    PixArt, SD3) also a multiple of 4, with ``sample_size`` a multiple of ``patch_size``. One
    :class:`DitqError` naming ``where`` otherwise."""
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if hidden > MAX_HIDDEN:
        raise DitqError(f"{where}: num_attention_heads x attention_head_dim = {hidden}, more than {MAX_HIDDEN}")
    if grid and hidden % 4:  # the 2-D sin-cos position table gives each axis half the width, as sin and cos halves
        raise DitqError(f"{where}: num_attention_heads x attention_head_dim = {hidden} is not a multiple of 4")
    if grid and cfg["sample_size"] % cfg["patch_size"]:
        raise DitqError(f"{where}: sample_size {cfg['sample_size']} is not a multiple of patch_size {cfg['patch_size']}")
    return hidden


# The fields of a diffusers AutoencoderKL config that set its size (the rest are checked by building it
# on the meta device); Stable Diffusion's VAE: 4 blocks of up to 512 channels, 2 layers per block.
VAE_CONFIG: dict[str, Any] = {
    "in_channels": Int(1, 1024, 3),
    "out_channels": Int(1, 1024, 3),
    "latent_channels": Int(1, 1024, 4),
    "layers_per_block": Int(1, 16, 1),
    "block_out_channels": ListOf(Int(1, 8192), 16, [64]),
    "down_block_types": ListOf(Text(64), 16, ["DownEncoderBlock2D"]),
    "up_block_types": ListOf(Text(64), 16, ["UpDecoderBlock2D"]),
    "norm_num_groups": Int(1, 1024, 32),
    "scaling_factor": Float(0.0, MAX_SCALING_FACTOR, 0.18215, open_lo=True, nullable=True),
    "shift_factor": Float(-MAX_SCALING_FACTOR, MAX_SCALING_FACTOR, None, nullable=True),  # SD3, Flux: latents / scale + shift
}

SOURCE_KINDS = ("builtin", "preset", "diffusers", "dit-checkpoint")


def check_source(obj: Any, where: str) -> dict[str, Any]:
    """A model ``source`` record (``ditq.source``) with the fields its kind needs checked."""
    base = check_fields(obj, {"kind": OneOf(SOURCE_KINDS)}, where, required=("kind",))
    by_name = base["kind"] in ("builtin", "preset")
    schema = {
        ("name" if by_name else "path"): Text(),
        "sha256": Text(64, None, nullable=True),
        "seed": Int(0, 2**32 - 1, 0),
        "image_size": Int(256, 1024, None, nullable=True),  # 256, 512 (DiT) or 1024 (text-to-image presets): load_model says so
        "num_heads": Int(1, 1024, None, nullable=True),
    }
    return check_fields(obj, schema, where, required=("name",) if by_name else ("path",))
