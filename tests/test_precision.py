"""A half-precision patch run reports its error against float32 on a sample of its cells
(patching.analyses.patch.precision): the float32 values it reports must be the float32 sweep's own
cells, and the errors what the two give."""
from __future__ import annotations

import numpy as np
import pytest

import patching.core.context as context
from conftest import assert_close
from patching.analyses.patch.report import lines
from patching.api import ModelSpec, Pair, load, run

PAIR = Pair("Michelle Jones was a top-notch student. Michelle", "Jessica Smith was a top-notch student. Jessica",
            "Jones", "Smith")


@pytest.mark.parametrize("site,every", [("resid_post", False), ("z", False), ("z", True)])
def test_bfloat16_run_reports_float32_of_its_sampled_cells(tiny_ckpt, monkeypatch, site, every):
    monkeypatch.setattr(context, "cpu_bf16", lambda: "AMX")  # any CPU computes bfloat16, if slowly without it
    half = run("patch", load(ModelSpec(model=str(tiny_ckpt), device="cpu", dtype="bfloat16")), PAIR,
               site=site, all_positions=every)
    full = run("patch", load(ModelSpec(model=str(tiny_ckpt), device="cpu")), PAIR, site=site, all_positions=every)
    assert full.precision is None and "precision" not in full.to_json()
    q = half.to_json()["precision"]
    assert q["dtype"] == "bfloat16" and len(q["cells"]) == min(10, half.matrix.size) and q["n_top"] == 6
    scale = max(abs(full.clean.value), abs(full.corrupt.value))
    errors = []
    for c in q["cells"]:
        cell = tuple(c["cell"])
        assert_close(c["float32"], full.matrix[cell], scale=scale, what=f"float32 reference at {cell}")
        assert c["value"] == pytest.approx(float(half.matrix[cell]), abs=0)
        errors.append(abs(c["value"] - c["float32"]))
    assert q["max_abs_error"] == pytest.approx(max(errors))
    # the six strongest of the bfloat16 sweep come first
    base = half.corrupt.value
    strongest = np.sort(np.abs(half.matrix.ravel() - base))[::-1][:6]
    assert np.allclose(sorted((abs(c["value"] - base) for c in q["cells"][:6]), reverse=True), strongest)
    assert "against float32" in "\n".join(lines(half))
