"""Exported DiT presets in ONNX Runtime vs the PyTorch reference (``ditq validate``), and its failures."""

import json

import numpy as np
import onnx
import pytest

import ditq
from ditq.adapters import adapter_for
from ditq.exporter.export import DATA_FILE, MODEL_FILE
from ditq.manifest import MANIFEST_FILE, RECIPE_FILE, file_sha256
from ditq.recipe import Recipe
from ditq.runtime.integrity import MANIFEST_CHECK

DIT_ADAPTER = adapter_for("DiTTransformer2DModel")  # the family of the models here
DIT = DIT_ADAPTER.coverage


@pytest.fixture(scope="module")
def dit_s():
    return ditq.load_model("dit-s-2")


@pytest.mark.slow  # DiT-S/2 exports validated: about 30 s each (the tiny-model exports validate in the fast lane)
@pytest.mark.parametrize("wbits,abits,group", [(8, 8, 64), (6, 8, 64), (4, 8, 64), (4, None, 128)])
def test_preset_parity(tmp_path, wbits, abits, group):
    loaded = ditq.load_model("dit-s-2")  # fresh: validation swaps the reference into its model
    qdit = ditq.quantize(loaded.model, Recipe.qdit(DIT, wbits, abits, group))
    res = ditq.export(qdit, tmp_path / "m", source=loaded.source)
    report = ditq.validate(tmp_path / "m")
    assert report.passed, report.table()
    names = [c.name for c in report.checks]
    # two folder checks, the default-session check; the bit-exact activation code check runs when A is quantized
    assert len(names) == (8 if abits else 7)
    assert [c.batch for c in report.cases] == [1, 2, 3]  # dynamic batch
    for c in report.cases:
        assert c.sqnr_ort_vs_ref_db >= c.bound_db
    # the quantization itself: W8A8 is close to float, W4 far less so
    q = min(c.sqnr_ref_vs_float_db for c in report.cases)
    assert q > (30 if wbits == 8 else 10)
    manifest = json.loads((tmp_path / "m" / MANIFEST_FILE).read_text())
    for name, info in manifest["files"].items():
        assert file_sha256(tmp_path / "m" / name) == info["sha256"]
    assert Recipe.load(tmp_path / "m" / RECIPE_FILE) == qdit.recipe
    meta = {p.key: p.value for p in onnx.load(str(res.model_path), load_external_data=False).metadata_props}
    assert json.loads(meta["ditq.source"]) == loaded.source and "ditq.version" in meta


@pytest.mark.slow  # DiT-S/2 float and W4 exports: about 20 s
def test_w4_file_is_small(tmp_path, dit_s):
    """4-bit codes + an fp32 scale and a 4-bit zero point per 128 weights: ~4.28/32 = 0.134 of fp32."""
    qdit = ditq.quantize(dit_s.model, Recipe.qdit(DIT, 4, 8, 128))
    res = ditq.export(qdit, tmp_path / "m", source=dit_s.source)
    float_bytes = sum(p.numel() * 4 for p in dit_s.model.parameters())
    assert res.file_bytes / float_bytes < 0.16


@pytest.mark.slow  # DiT-S/2 export and validation: about 30 s (tampered tiny exports failing validate stay in the fast lane)
def test_validate_fails_on_a_tampered_model(tmp_path, dit_s):
    qdit = ditq.quantize(dit_s.model, Recipe.qdit(DIT, 4, 8, 64))
    ditq.export(qdit, tmp_path / "m", source=dit_s.source)
    path = tmp_path / "m" / MODEL_FILE
    model = onnx.load(str(path))
    scale = next(t for t in model.graph.initializer if t.name == "transformer_blocks.3.ff.net.2.qscale")
    arr = onnx.numpy_helper.to_array(scale).copy()
    arr[0, :] *= 1.5  # one group row of one layer
    scale.CopyFrom(onnx.numpy_helper.from_array(arr, scale.name))
    onnx.save(model, str(path))
    report = ditq.validate(tmp_path / "m")
    assert not report.passed
    failed = [c.name for c in report.checks if not c.passed]
    assert failed == [MANIFEST_CHECK, "stored codes and scales equal the reference's"]  # the edit changed model.onnx's hash


@pytest.mark.slow  # DiT-S/2 export and validation: about 30 s
def test_validate_fails_on_a_wrong_activation_step(tmp_path, dit_s):
    """A graph that quantizes activations to 7 bits where the recipe says 8: the code check and the
    output accuracy criterion must both catch it (the weight checks can't: the weights are right)."""
    qdit = ditq.quantize(dit_s.model, Recipe.qdit(DIT, 8, 8, 64))
    ditq.export(qdit, tmp_path / "m", source=dit_s.source)
    path = tmp_path / "m" / MODEL_FILE
    model = onnx.load(str(path))
    qmax = next(t for t in model.graph.initializer if t.name == "ditq/const/qmax_255")
    qmax.CopyFrom(onnx.numpy_helper.from_array(np.array(127.0, np.float32), qmax.name))
    onnx.save(model, str(path))
    report = ditq.validate(tmp_path / "m")
    failed = [c.name for c in report.checks if not c.passed]
    assert failed == [MANIFEST_CHECK, "activation codes equal the reference numerics (bit exact)"]
    assert not any(c.passed for c in report.cases)
    assert all(c.sqnr_ort_vs_float_db < c.sqnr_ref_vs_float_db - 1 for c in report.cases)


@pytest.mark.slow
def test_reexport_does_not_grow_the_data_file(tmp_path, tiny_dit):
    qdit = ditq.quantize(tiny_dit, Recipe.qdit(DIT, 4, 8, 16))
    sizes = []
    for _ in range(2):
        ditq.export(qdit, tmp_path / "m", external_data_bytes=0)
        sizes.append((tmp_path / "m" / DATA_FILE).stat().st_size)
    assert sizes[0] == sizes[1] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging folders left behind


@pytest.mark.slow  # about 15 s; test_atomic_swap's kills between swap steps stay in the fast lane
def test_crash_leaves_the_old_export_intact(tmp_path, tiny_dit, monkeypatch):
    qdit = ditq.quantize(tiny_dit, Recipe.qdit(DIT, 4, 8, 16))
    ditq.export(qdit, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def crash(proto, path, **kw):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr("ditq.exporter.export.onnx.save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        ditq.export(ditq.quantize(tiny_dit, Recipe.qdit(DIT, 8, 8, 16)), tmp_path / "m")
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(OSError):
        ditq.export(qdit, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


@pytest.mark.slow
def test_validate_with_explicit_model_and_recipe(tmp_path, tiny_dit):
    folder = tmp_path / "dit"
    tiny_dit.save_pretrained(folder)
    recipe = Recipe.qdit(DIT, 4, 8, 16)
    (tmp_path / "r.json").write_text(recipe.to_json())
    loaded = ditq.load_model(str(folder))
    ditq.export(ditq.quantize(loaded.model, recipe), tmp_path / "m", source={"kind": "elsewhere"})
    report = ditq.validate(tmp_path / "m", model_spec=str(folder), recipe_path=tmp_path / "r.json")
    assert report.passed, report.table()
    # the same model checked against the wrong recipe fails the structural checks
    (tmp_path / "r8.json").write_text(Recipe.qdit(DIT, 8, 8, 16).to_json())
    assert not ditq.validate(tmp_path / "m", model_spec=str(folder), recipe_path=tmp_path / "r8.json").passed
    assert np.isfinite(report.cases[0].sqnr_ref_vs_float_db)


def test_runtime_runs_an_export_without_torch(tmp_path, tiny_dit):
    """The ONNX Runtime path (what samplers use) imports neither torch nor diffusers."""
    import subprocess
    import sys

    loaded_source = {"kind": "api"}
    qdit = ditq.quantize(tiny_dit, Recipe.qdit(DIT, 4, 8, 16))
    ditq.export(qdit, tmp_path / "m", source=loaded_source)
    x, t, y = (a.numpy() for a in DIT_ADAPTER.example_inputs(dict(tiny_dit.config), batch=2, seed=5))
    np.savez(tmp_path / "in.npz", x=x, t=t, y=y)
    code = f"""
import sys, numpy as np
from ditq.runtime.session import OrtDiT
d = np.load({str(tmp_path / 'in.npz')!r})
out = OrtDiT({str(tmp_path / 'm' / MODEL_FILE)!r})(d['x'], d['t'], d['y'])
np.save({str(tmp_path / 'out.npy')!r}, out)
assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'torch imported'
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import torch

    with torch.no_grad():
        want = qdit.reference()(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample
    got = np.load(tmp_path / "out.npy")
    assert got.shape == (2, 8, 8, 8)
    from ditq.calib.numerics import sqnr_db

    assert sqnr_db(want.numpy(), got) > 40  # the same model (see the validation bound; measured 120+ dB here)
