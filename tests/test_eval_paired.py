"""``ditq eval``'s paired differences: each configuration against the fp row on the same seed set (same noise,
same labels or prompts), so that seed-to-seed noise common to both cancels."""

from __future__ import annotations

import pytest

from ditq.workflows.evaluate import EvalReport, EvalRow, _paired


def _row(name, fids, accs):
    per = [{"seed": s, "fid": f, "class_accuracy": a} for s, f, a in zip((0, 1, 2), fids, accs)]
    return EvalRow(name, sum(fids) / len(fids), sum(accs) / len(accs), 40.0, 1000, per_seed=per)


def test_differences_are_taken_seed_set_by_seed_set_and_shown_in_the_table():
    fp = _row("fp", [1.0, 2.0, 3.0], [0.9, 0.8, 0.9])
    q = _row("w4a4", [1.5, 2.75, 3.25], [0.8, 0.8, 0.7])
    _paired(q, fp)
    # differences 0.5, 0.75, 0.25: mean 0.5, sample spread 0.25; accuracy -0.1, 0, -0.2: mean -0.1, spread 0.1
    assert q.fid_delta == pytest.approx(0.5) and q.fid_delta_std == pytest.approx(0.25)
    assert q.class_accuracy_delta == pytest.approx(-0.1) and q.class_accuracy_delta_std == pytest.approx(0.1)
    _paired(fp, fp)
    settings = {"model": "m", "num_samples": 3, "seeds": [0, 1, 2], "sampler": "ddim", "steps": 2, "cfg": 1.0,
                "group_size": 64, "method": "rtn", "real_images": 5}  # fmt: skip
    table = EvalReport([fp, q], 0.5, 0.1, settings).table()
    line = next(ln for ln in table.splitlines() if ln.startswith("w4a4"))
    assert "+0.50 ±0.25" in line and "-10.0 ±10.0" in line
    assert "dFID vs fp" in table
