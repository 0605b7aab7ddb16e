"""The two code checks of ``ditq validate``, in bounded memory.

A full-size model must validate within about its float32 weights plus its quantized file plus a bounded
working set (SD3-medium: 8.1 GB of weights on a 24 GB machine), so neither check holds all of anything:

- **Weight codes** (:func:`build_reference`): the reference is built in place of the float model one
  group of layers at a time (:func:`ditq.graphs.targets.layer_chunks`): the group's codes are made (round
  to nearest; GPTQ: read back from the file), compared with the stored ones, dequantized into the
  reference's modules (each float weight is released as its layer is swapped) and dropped. In memory: the
  model (float, then reference), the file's tensors and one group's codes.
- **Activation codes** (:func:`check_activation_codes`): ONNX Runtime exposes quantizers' float inputs
  and codes as extra graph outputs. A graph output stays allocated until a run ends, fetched or not, so
  each run's session exposes only its own group of quantizers (:func:`probe_runs`: at most
  :data:`PROBE_BYTES` of outputs, sized by what the reference's layers read on the same input,
  :func:`input_sizes`); its weights are read from the model's own folder (no in-memory copy of the
  file). Each group's codes are recomputed and released before the next run.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import torch
import torch.nn as nn

from ditq.calib.numerics import choose_qparams, quantize
from ditq.calib.qlinear import quantize_weight, swap_module
from ditq.exporter.reference import reference_module
from ditq.graphs.targets import ActivationProbe, RecordedTarget, layer_chunks
from ditq.recipe import LayerPlan
from ditq.runtime.session import create_session, run_session

PROBE_BYTES = 1 << 30  # graph outputs per probing run: float inputs (4 bytes an element) and codes (1 byte)
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"  # ORT: where a serialized model's external data is


def build_reference(model: nn.Module, plans: dict[str, LayerPlan], proto: onnx.ModelProto, target: RecordedTarget,
                    method: str, *, stored: bool) -> list[str]:  # fmt: skip
    """Swap every covered layer of ``model`` for its reference module, group by group; returns where the
    codes ``proto`` stores differ from the reference's (the target's comparisons, message for message as
    one comparison of all layers). ``stored``: the reference takes the codes the file stores (GPTQ's
    depend on calibration data), so there is nothing to compare."""
    parts: list[list[str]] = []
    for chunk in layer_chunks(plans):
        if stored:
            codes = target.read_weights(proto, chunk)[0]
        else:
            codes = {n: quantize_weight(model.get_submodule(n).weight, p, method) for n, p in chunk.items()}
            found = target.weight_comparisons(proto, chunk, codes)
            parts = [a + b for a, b in zip(parts, found)] if parts else found
        for name, plan in chunk.items():
            swap_module(model, name, reference_module(model.get_submodule(name), plan, codes[name]))
        del codes
    model.eval()
    return [f for part in parts for f in part]


@contextmanager
def input_sizes(model: nn.Module, names: list[str]) -> Iterator[dict[str, int]]:
    """Within the block, the elements of the largest input each module in ``names`` reads (its activation
    quantizer's input in the graph has as many)."""
    sizes: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            sizes[name] = max(sizes.get(name, 0), args[0].numel())

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        yield sizes
    finally:
        for h in handles:
            h.remove()


def probe_runs(probes: list[ActivationProbe], sizes: dict[str, int], budget: int | None = None) -> list[list[ActivationProbe]]:
    """``probes`` in order, grouped into runs whose outputs (each tensor once) take at most ``budget``
    bytes (default :data:`PROBE_BYTES`) by ``sizes`` (module -> elements); a probe larger than that, or
    of no known size, runs alone."""
    budget = PROBE_BYTES if budget is None else budget
    runs: list[list[ActivationProbe]] = []
    run: list[ActivationProbe] = []
    names: set[str] = set()
    used = 0
    for p in probes:
        n = sizes.get(p.module)
        new = [(t, b) for t, b in ((p.input, 4), (p.codes, 1)) if t not in names]
        cost = budget + 1 if n is None else n * sum(b for _, b in new)
        if run and used + cost > budget:
            runs.append(run)
            run, names, used = [], set(), 0
            cost = budget + 1 if n is None else 5 * n
        run.append(p)
        names |= {p.input, p.codes}
        used += cost
    if run:
        runs.append(run)
    return runs


def check_activation_codes(path: Path, probes: list[ActivationProbe], feeds: dict[str, np.ndarray], sizes: dict[str, int],
                           *, provider: str, config: dict[str, str]) -> tuple[list[str], int]:  # fmt: skip
    """Run the model at ``path`` on ``feeds`` with ``probes``' tensors exposed (:func:`probe_runs`), and
    recompute every probe's codes from its float input with the reference numerics; returns the
    quantizers whose codes differ (``module: k of n codes differ``) and how many codes were compared."""
    bad, total = [], 0
    for run in probe_runs(probes, sizes):
        names = list(dict.fromkeys(t for p in run for t in (p.input, p.codes)))
        graph = onnx.load(str(path), load_external_data=False)  # the graph; its external data stays on disk
        graph.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names)
        session = create_session(graph.SerializeToString(), provider=provider,
                                 config={**config, EXTERNAL_DATA_FOLDER: str(path.parent)})  # fmt: skip
        del graph
        outs = dict(zip(names, run_session(session, feeds, names, where=str(path))))
        del session
        for p in run:
            xin, got = torch.from_numpy(outs[p.input]), outs[p.codes].astype(np.int16) - p.offset
            s, z = choose_qparams(xin, p.bits, p.group_size, p.symmetric)
            want = quantize(xin, s, z, p.bits, p.symmetric).numpy().astype(np.int16)
            got = got.reshape(want.shape)  # the int8 kernel quantizes a [tokens, K] view
            total += want.size
            diff = int((want != got).sum())
            if diff:
                bad.append(f"{p.module}: {diff} of {want.size} codes differ")
        del outs
    return bad, total
