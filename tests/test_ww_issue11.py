"""weightwatcher 0.7.7 parity for issue 11: layer selection under ``ww_compat``."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from lightning_htsr import analyze
from lightning_htsr.ww_select import ww_layer_shape, ww_skip_reason

ww = pytest.importorskip("weightwatcher")


@pytest.fixture(autouse=True)
def _quiet_weightwatcher():
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


def _selection_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(256, 512, (64, 1)),  # M * rf = 16384 > max_evals: weightwatcher skips it
        nn.Conv2d(1, 128, (512, 1)),  # 512 single-column slices: weightwatcher analyzes them
        nn.Conv2d(4, 3, (1, 2)),  # out < in, rf even: weightwatcher counts M * rf = 4 * 2 = 8 (we have 6 evals)
        nn.Conv2d(3, 5, (1, 3)),
        nn.Linear(7, 40),  # 7 < min_evals
        nn.MultiheadAttention(32, 4),  # in_proj not analyzed, out_proj (a Linear) is
        nn.LSTM(16, 16),
        nn.Embedding(20, 9),
        nn.Conv1d(8, 16, 3),  # weightwatcher: M = min(shape) = 3 < 8
        nn.ConvTranspose2d(16, 16, 3),  # not a type weightwatcher knows
    )


def test_ww_compat_selects_the_layers_weightwatcher_selects() -> None:
    model = _selection_model()
    ref = ww.WeightWatcher(model=model).analyze()
    ours = analyze(model, ww_compat=True)
    analyzed = ours[ours["status"] != "skipped"]
    assert list(analyzed["name"]) == list(ref["longname"]) == ["1", "2", "3", "5.out_proj", "7"]
    np.testing.assert_allclose(analyzed["alpha"].to_numpy(float), ref["alpha"].to_numpy(float), rtol=1e-6)
    reasons = dict(zip(ours["name"], ours["skip_reason"]))
    assert reasons["0"] == "weightwatcher: M * rf = 16384 > max_evals=15000"
    assert "does not analyze MultiheadAttention" in reasons["5.in_proj.q"]
    assert "does not analyze ConvTranspose2d" in reasons["9"]
    default = analyze(model)  # default selection unchanged
    assert default.set_index("name").loc["0", "status"] == "success"
    assert default.set_index("name").loc["1", "status"] == "skipped"


def test_ww_layer_shape_counts_as_weightwatcher() -> None:
    assert ww_layer_shape("conv2d", (512, 256, 64, 1)) == (512, 256, 64)
    assert ww_layer_shape("conv2d", (128, 1, 512, 1)) == (128, 1, 512)  # "channels first" detected
    assert ww_layer_shape("conv2d", (128, 256, 2, 2)) == (128, 256, 4)  # one swap per slice: rf even, no swap
    assert ww_layer_shape("conv2d", (128, 256, 3, 3)) == (256, 128, 9)
    assert ww_layer_shape("embedding", (60000, 8)) == (60000, 8, 1)
    assert ww_skip_reason(60000, 8, 1) == "weightwatcher: N = 60000 > max_N=50000"
    assert ww_skip_reason(128, 1, 512) is None

