"""``ditq sensitivity``: each block unit quantized alone (Q-DiT: RTN weights, dynamic per-group activations) and
the model output's relative error; the streams (image / text / joint tokens) the family adapters declare.

The reference for one unit's error is written here: min-max asymmetric fake quantization with the zero range
included (Q-DiT's quantizer), per output row and input-channel group for the weights, per token and group
for the activations, applied by a forward hook on a copy of the model."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ditq.adapters import adapter_for
from ditq.calib.sensitivity import block_units, unit_errors, unit_stream
from ditq.exporter.reference import resolve_plans
from ditq.recipe import Recipe

from .conftest import assert_one_line_refusal, run
from .t2i_fixtures import digits_t2i_like


def _fake(x: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """Asymmetric min-max (range holding 0) quantize-dequantize per group of ``g`` along the last axis."""
    shape = x.shape
    xg = x.double().reshape(*shape[:-1], shape[-1] // g, g)
    mn, mx = xg.amin(-1, keepdim=True).clamp(max=0), xg.amax(-1, keepdim=True).clamp(min=0)
    scale = ((mx - mn) / (2**bits - 1)).clamp(min=1e-8)
    zero = torch.round(-mn / scale)
    q = torch.clamp(torch.round(xg / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).reshape(shape)


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    from ditq.models import load_model

    folder = digits_t2i_like(tmp_path_factory.mktemp("sens"), seed=2)
    return folder, load_model(str(folder)).model


def test_the_streams_of_each_family_s_units_are_the_tokens_their_input_holds(t2i):
    streams = unit_stream(t2i[1])
    text = {"attn.add_qkv", "attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2"}
    image = {"attn.qkv", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"}
    for unit, s in streams.items():
        inner = unit.split(".", 2)[2]  # transformer_blocks.<i>.<group>
        assert s == ("text" if inner in text else "image" if inner in image else None), unit
    assert set(streams) == set(block_units(t2i[1]))
    assert "transformer_blocks.1.attn.to_add_out" not in streams  # the last block has no text output
    from ditq.adapters.flux import COVERAGE as FLUX
    from ditq.adapters.pixart import COVERAGE as PIXART

    assert {g.name: g.stream for g in FLUX.more_blocks[0].activation_groups} == {"qkv_mlp": "joint", "proj_out": "joint"}
    assert [g.name for g in PIXART.activation_groups if g.stream == "text"] == ["attn2.kv"]  # keys/values of the captions


def test_one_unit_s_error_equals_a_fake_quantized_copy_written_here(t2i):
    model = t2i[1]
    adapter = adapter_for(model)
    torch.manual_seed(0)
    inputs = adapter.example_inputs(dict(model.config), batch=3)
    plans = {32: resolve_plans(model, Recipe.qdit(adapter.coverage_of(model), 4, 4, 32))}
    errs = unit_errors(model, inputs, plans)
    forward = adapter.wrap(model)
    with torch.no_grad():
        ref = forward(*inputs).double()
    for unit in ("transformer_blocks.0.attn.add_qkv", "transformer_blocks.1.ff.net.0.proj"):
        copy_ = copy.deepcopy(model)
        for m in block_units(model)[unit]:
            lin = copy_.get_submodule(m)
            w = _fake(lin.weight.detach(), 4, 32).float()
            lin.weight.data.copy_(w)
            lin.register_forward_pre_hook(lambda mod, args: (_fake(args[0], 4, 32).float(),))
        with torch.no_grad():
            out = adapter.wrap(copy_)(*inputs).double()
        want = float(((out - ref) ** 2).sum() / (ref**2).sum())
        assert want > 0 and errs[unit][32] == pytest.approx(want, rel=1e-3), unit  # float32 rounding of the forward only


def test_the_cli_table_ranks_units_and_summarises_streams(t2i, tmp_path, capsys):
    out = tmp_path / "s.json"
    code, stdout, err = run(["sensitivity", "--model", str(t2i[0]), "--group-sizes", "64,32", "--json", str(out)], capsys)
    assert code == 0, err
    rep = json.loads(out.read_text())
    assert rep["group_sizes"] == [32, 64] and rep["wbits"] == 4 and rep["abits"] == 4
    assert {r["stream"] for r in rep["rows"]} == {"image", "text"}
    assert sorted(rep["summary"]) == ["image", "text"] and rep["summary"]["text"]["units"] == 5  # add_qkv x2, 3 text outputs of block 0
    worst = max(rep["rows"], key=lambda r: r["errors"]["64"])["unit"]
    assert next(ln for ln in stdout.splitlines() if ln.startswith(worst)).split()[-1] == "1"
    code, _, err = run(["sensitivity", "--model", str(t2i[0]), "--group-sizes", "48"], capsys)
    assert_one_line_refusal(code, err, "48")


def test_only_the_units_take_the_group_size_so_the_embedders_width_need_not_divide_it():
    """The digits DiT: block linears 192 and 768 wide, the timestep MLP 256 wide; g192 fits the units."""
    from ditq.models import load_model
    from ditq.workflows.sensitivity import _unit_recipe

    model = load_model("digits").model
    coverage = adapter_for(model).coverage_of(model)
    plans = resolve_plans(model, _unit_recipe(coverage, 4, 4, 192, False))
    assert plans["transformer_blocks.0.attn1.to_q"].group_size == 192 and plans["transformer_blocks.0.attn1.to_q"].abits == 4
    emb = next(n for n in plans if "timestep_embedder.linear_1" in n)
    assert plans[emb].abits is None and plans[emb].group_size in (None, 256)  # per channel: the whole 256-wide row
