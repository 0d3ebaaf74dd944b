"""weightwatcher 0.7.7's options: ``layers=`` ids, ``xmax``, the finger thresholds, ``max_N`` and the
truncated power laws, each against weightwatcher's own code on small models; and the same options through
``analyze_state_dict`` / ``analyze_checkpoint``."""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from lightning_htsr import analyze, analyze_checkpoint, analyze_state_dict
from lightning_htsr.analysis import AnalysisOptions, resolve_options
from lightning_htsr.records import COLUMNS
from lightning_htsr.weights.ww_select import ww_layer_ids

ww = pytest.importorskip("weightwatcher")
ww_module = pytest.importorskip("weightwatcher.weightwatcher")

FIT_COLUMNS = ["alpha", "D", "xmin", "xmax", "sigma"]


@pytest.fixture(autouse=True)
def _quiet_weightwatcher():
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


def ww_analyze(model: nn.Module, **kwargs) -> pd.DataFrame:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return ww.WeightWatcher(model=model).analyze(**kwargs)


def heavy(model: nn.Module, seed: int = 1) -> nn.Module:
    """Student-t weights: heavy-tailed ESDs with real power-law tails."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.from_numpy(rng.standard_t(2.5, p.shape) / np.sqrt(p[0].numel())))
    return model


def nested() -> nn.Module:
    torch.manual_seed(0)
    return heavy(nn.Sequential(
        nn.Linear(120, 200),  # id 1
        nn.ReLU(),  # id 2
        nn.Sequential(nn.Linear(200, 160), nn.Tanh(), nn.Linear(160, 150)),  # ids 3 (4, 5, 6)
        nn.Conv2d(3, 24, 3),  # id 7
        nn.Linear(150, 64),  # id 8
    ))


def analyzed(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] != "skipped"].set_index("name")


def assert_fit_columns_match(ours: pd.DataFrame, ref: pd.DataFrame, columns=FIT_COLUMNS) -> None:
    ref = ref.set_index("longname")
    assert list(ours.index) == list(ref.index)
    for col in columns:
        np.testing.assert_allclose(ours[col].to_numpy(float), ref[col].to_numpy(float), rtol=1e-6, err_msg=col)


# ------------------------------------------------------------------------------------------------ layers=


def test_layer_ids_are_weightwatchers_layer_id() -> None:
    model = nested()
    ref = ww_analyze(model)
    ids = ww_layer_ids(model)
    assert [ids[name] for name in ref["longname"]] == list(ref["layer_id"]) == [1, 4, 6, 7, 8]


@pytest.mark.parametrize("layers", [[4, 8], [1], [-4, -7], [-1]])
def test_layers_ids_keep_and_exclude_as_weightwatcher(layers) -> None:
    model = nested()
    ref = ww_analyze(model, layers=layers)
    ours = analyzed(analyze(model, ww_compat=True, layers=layers))
    assert_fit_columns_match(ours, ref)


def test_layers_by_name_keep_or_leave_out() -> None:
    model = nested()
    assert list(analyze(model, layers=["2.0", "4"])["name"]) == ["2.0", "4"]
    assert list(analyze(model, layers=["-2.0", "-4"])["name"]) == ["0", "2.2", "3"]
    assert list(analyze(model, layers=6)["name"]) == ["2.2"]
    with pytest.raises(ValueError, match="all keep or all leave out"):
        analyze(model, layers=["2.0", "-4"])


# ------------------------------------------------------------------------------------------------ xmax, fingers


@pytest.mark.parametrize("xmax", [-3, 2, 1])
def test_xmax_leaves_out_the_top_eigenvalues_as_weightwatcher(xmax: int) -> None:
    model = nested()
    ref = ww_analyze(model, xmax=xmax)
    ours = analyzed(analyze(model, ww_compat=True, xmax=xmax))
    assert_fit_columns_match(ours, ref)
    np.testing.assert_array_equal(ours["num_pl_spikes"], ref["num_pl_spikes"])


def test_xmax_too_large_fails_the_fit_where_weightwatcher_caps_at_the_number() -> None:
    torch.manual_seed(0)
    model = heavy(nn.Sequential(nn.Linear(20, 40)))
    # weightwatcher 0.7.7 logs "xmax is too large, stopping" for more than half of the 20 eigenvalues, then fits
    # with the number 11 as a cap on the eigenvalues: what a float xmax does here.
    ref = ww_analyze(model, xmax=11)
    capped = analyze(model, ww_compat=True, xmax=11.0).set_index("name")
    assert_fit_columns_match(capped, ref)
    np.testing.assert_array_equal(capped["num_pl_spikes"], ref["num_pl_spikes"])
    with pytest.warns(UserWarning, match="leaves out more than half"):
        ours = analyze(model, ww_compat=True, xmax=11)
    assert ours["alpha"].isna().all() and (ours["status"] == "degenerate").all()


def test_xmax_float_caps_the_tail() -> None:
    model = nested()
    full = analyze(model, ww_compat=True).set_index("name")
    cap = float(full.loc["0", "lambda_max"]) * 0.5
    capped = analyze(model, ww_compat=True, xmax=cap).set_index("name")
    assert capped.loc["0", "xmax"] <= cap < full.loc["0", "xmax"]


@pytest.mark.parametrize("kwargs", [{"finger_thresh": 0.3}, {"finger_thresh": 2.0},
                                    {"max_fingers": 20, "finger_thresh": 0.2}, {"max_fingers": 3}])
def test_finger_thresholds_as_weightwatcher(kwargs) -> None:
    torch.manual_seed(0)
    model = heavy(nn.Sequential(nn.Linear(30, 60), nn.Linear(60, 256), nn.Linear(256, 300)), seed=3)
    ref = ww_analyze(model, fix_fingers="clip_xmax", **kwargs)
    ours = analyzed(analyze(model, ww_compat=True, fix_fingers="clip_xmax", **kwargs))
    assert_fit_columns_match(ours, ref, FIT_COLUMNS + ["raw_alpha"])
    assert list(ours["num_fingers"]) == list(ref["num_fingers"])


def test_finger_options_weightwatcher_refuses_are_value_errors() -> None:
    with pytest.raises(ValueError, match="can not be combined with xmax"):
        AnalysisOptions(fix_fingers="clip_xmax", xmax=-2)
    with pytest.raises(ValueError, match="max_fingers must be >= 1"):
        AnalysisOptions(max_fingers=0)
    with pytest.raises(ValueError, match="xmax can not be 0"):
        AnalysisOptions(xmax=0)
    with pytest.raises(ValueError, match="fix_fingers must be"):
        resolve_options(fix_fingers="clip")


# ------------------------------------------------------------------------------------------------ max_N


def test_max_n_under_ww_compat_as_weightwatcher() -> None:
    model = nested()
    ref = ww_analyze(model, max_N=170, max_evals=160)  # weightwatcher refuses max_N < max_evals
    ours = analyze(model, ww_compat=True, max_N=170, max_evals=160)
    assert_fit_columns_match(analyzed(ours), ref)
    assert "max_N=170" in ours.set_index("name").loc["0", "skip_reason"]


# ------------------------------------------------------------------------------------------------ TPL, E_TPL


def _pl_fit_for_powerlaw_2(data=None, xmin=None, xmax=None, verbose=False, distribution="power_law",
                           pl_package="ww"):
    """weightwatcher 0.7.7's ``WW_powerlaw.pl_fit`` (its ``powerlaw`` branch) without ``distribution=``, which
    ``powerlaw`` 2.0 no longer accepts (0.7.7 passes it, so its TPL fits fail with the installed package)."""
    import powerlaw

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return powerlaw.Fit(data, xmin=xmin, xmax=xmax, verbose=verbose, xmin_distribution=distribution)


def _tpl_model(fit: str = "TPL") -> nn.Module:
    """Small (the powerlaw package fits a truncated law per candidate xmin: seconds for 50 eigenvalues). E_TPL
    scans only the candidates in (log10(0.95 peak), 1.5 peak) of a 100-bin log histogram: it needs a spectrum
    large enough for that window to hold two eigenvalues (weightwatcher's fit fails otherwise, and so does ours)."""
    torch.manual_seed(0)
    if fit == "E_TPL":
        return heavy(nn.Sequential(nn.Linear(100, 200)), seed=5)
    return heavy(nn.Sequential(nn.Linear(24, 48), nn.Linear(48, 30)), seed=5)


def test_weightwatchers_tpl_fails_with_powerlaw_2() -> None:
    pytest.importorskip("powerlaw")
    ref = ww_analyze(_tpl_model(), fit="TPL", pl_package="powerlaw")
    assert (ref["alpha"] == -1).all() and (ref["Lambda"] == -1).all()


@pytest.mark.parametrize("fit", ["TPL", "E_TPL"])
def test_truncated_power_law_matches_weightwatchers_columns(fit: str, monkeypatch) -> None:
    pytest.importorskip("powerlaw")
    monkeypatch.setattr(ww_module, "pl_fit", _pl_fit_for_powerlaw_2)
    model = _tpl_model(fit)
    ref = ww_analyze(model, fit=fit, pl_package="powerlaw")
    assert (ref["alpha"] > 0).all()
    ours = analyzed(analyze(model, ww_compat=True, fit=fit))
    assert_fit_columns_match(ours, ref, ["alpha", "Lambda", "xmin", "D"])
    np.testing.assert_array_equal(ours["num_pl_spikes"], ref["num_pl_spikes"])
    assert "Lambda" not in analyze(model, ww_compat=True).columns


# ------------------------------------------------------------------------------------------------ other front doors


@pytest.mark.parametrize("kwargs", [{"randomize": True, "seed": 3}, {"fix_fingers": "clip_xmax", "finger_thresh": 0.5},
                                    {"xmax": -2}])
def test_state_dict_and_checkpoint_take_the_options(kwargs, tmp_path) -> None:
    torch.manual_seed(0)
    model = heavy(nn.Sequential(nn.Linear(120, 200), nn.ReLU(), nn.Linear(200, 160)))
    expected = analyze(model, **kwargs)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    extra = [c for c in expected.columns if c not in COLUMNS]  # the option's own columns
    assert extra or "xmax" in kwargs
    compared = ["name", "alpha", "D", "xmin", "xmax", "sigma", "num_pl_spikes", "entropy", *extra]
    for table in (analyze_state_dict(model.state_dict(), **kwargs), analyze_checkpoint(path, **kwargs)):
        assert [c for c in table.columns if c not in COLUMNS] == extra
        pd.testing.assert_frame_equal(table[compared], expected[compared])
