"""The ``lightning-htsr`` command line on real files: Lightning checkpoints, torch.save'd and safetensors state dicts,
damaged and hostile files, and reports of real training runs with ``HTSRCallback``."""

from __future__ import annotations

import argparse
import html
import json
import os
import pathlib
import pickle
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TinyNet, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import save_file
from torch import nn

import lightning_htsr as htsr
from lightning_htsr import HTSRCallback
from lightning_htsr.analysis import analyze_stream
from lightning_htsr.functional import eigenvalues
from lightning_htsr.records import COLUMNS
from lightning_htsr.training.sinks.history import HistoryWriter, read_history, write_spectra
from lightning_htsr.training.stopping import StopReason
from lightning_htsr.views.cli import main
from lightning_htsr.views.report import write_report
from lightning_htsr.weights.state_dict import state_dict_matrices

PNG = b"\x89PNG\r\n\x1a\n"


def run(capsys: pytest.CaptureFixture[str], *argv: str | os.PathLike[str]) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_rows_match(table: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Same matrices in the same order, same alphas (NaN where skipped) and phases."""
    assert table["name"].astype(str).tolist() == expected["name"].astype(str).tolist()
    np.testing.assert_allclose(table["alpha"].to_numpy(float), expected["alpha"].to_numpy(float), rtol=1e-9,
                               equal_nan=True)
    assert table["phase"].fillna("").tolist() == expected["phase"].fillna("").tolist()
    assert table["status"].tolist() == expected["status"].tolist()


def mixed_model() -> nn.Module:
    """Linear, Conv2d, Embedding and a too-small head: every kind of matrix a state dict can hold."""
    torch.manual_seed(3)
    return nn.ModuleDict({"conv": nn.Conv2d(16, 64, 3), "fc": nn.Linear(128, 256), "emb": nn.Embedding(300, 64),
                          "head": nn.Linear(256, 2)})


# ---------------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two real runs logged under one root: version_0 trains a heavy-tailed TinyNet that HTSRCallback stops after
    epoch 0 (with a ModelCheckpoint), version_1 (newer) a random one that runs to max_epochs."""
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    model = TinyNet(lr=1e-7, heavy=True)  # larger rates blow Pareto weights up to NaN
    stopper = HTSRCallback(stop_on="heavy_tailed", stop_rule="phase_fraction", stop_fraction=0.5,
                           log_figures_every=None)
    ckpt = ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True)
    trainer = pl.Trainer(callbacks=[stopper, ckpt], **trainer_kwargs(
        root, logger=CSVLogger(str(root), name="logs"), enable_checkpointing=True, max_epochs=4))
    trainer.fit(model)
    assert stopper.stopping_reason is StopReason.PHASE_FRACTION and trainer.current_epoch == 1

    torch.manual_seed(0)
    observer = HTSRCallback(log_figures_every=None)
    trainer = pl.Trainer(callbacks=[observer], **trainer_kwargs(
        root, logger=CSVLogger(str(root), name="logs"), max_epochs=2))
    trainer.fit(TinyNet(lr=0.0))
    return {"root": root, "model": model, "ckpt": Path(ckpt.last_model_path), "stopper": stopper,
            "stopped_dir": root / "logs" / "version_0", "observed_dir": root / "logs" / "version_1"}


# ---------------------------------------------------------------------------------------------- analyze


def test_analyze_lightning_checkpoint_matches_analyze_of_the_model(runs, tmp_path, capsys) -> None:
    ckpt = runs["ckpt"]
    assert ckpt.suffix == ".ckpt" and "state_dict" in torch.load(ckpt, weights_only=True)
    expected = htsr.analyze(runs["model"])
    code, out, err = run(capsys, "analyze", ckpt, "--csv", tmp_path / "t.csv", "--json", tmp_path / "t.json")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "t.csv")
    assert list(table.columns) == list(COLUMNS)
    assert_rows_match(table, expected)
    records = json.loads((tmp_path / "t.json").read_text())
    assert isinstance(records, list) and len(records) == len(expected)
    assert all(list(r) == list(COLUMNS) for r in records)
    np.testing.assert_allclose([np.nan if r["alpha"] is None else r["alpha"] for r in records],
                               expected["alpha"].to_numpy(float), rtol=1e-13, equal_nan=True)  # full precision
    # the printed table: header, one line per matrix, the summary line
    lines = out.splitlines()
    assert lines[0].split() == ["name", "N", "M", "alpha", "D", "entropy", "stable_rank", "mp_softrank",
                                "num_spikes", "phase", "warning", "status"]
    for name, alpha, phase in zip(expected["name"], expected["alpha"], expected["phase"]):
        row = next(line for line in lines[2:] if line.split()[0] == name)
        shown = f"{alpha:.3f}" if alpha == alpha else "-"
        # a matrix too small to classify shows its raw alpha flagged in parentheses and phase "(too small)"
        assert (shown if isinstance(phase, str) or shown == "-" else f"({shown})") in row.split()
        assert isinstance(phase, str) or "(too small)" in row or "skipped" in row
    assert "skipped: 2 eigenvalues < min_evals=10" in out  # net.6 (2 x 128)
    summary = htsr.summarize(expected)
    assert lines[-1].startswith(f"model: 4 matrices, {summary['num_analyzed']} analyzed, "
                                f"{summary['num_classified']} classified | mean alpha {summary['alpha']:.3f}")
    assert "Traceback" not in err


@pytest.mark.parametrize("layout", ["pt", "pth:model_state_dict", "bin:model", "ckpt:state_dict", "safetensors",
                                    "noext-safetensors", "legacy-pt"])
def test_analyze_state_dict_files_match_analyze_of_the_model(layout, tmp_path, capsys) -> None:
    model = mixed_model()
    sd = model.state_dict()
    kind, _, key = layout.partition(":")
    path = tmp_path / f"weights.{kind}"
    if kind in ("safetensors", "noext-safetensors"):
        path = tmp_path / ("model.safetensors" if kind == "safetensors" else "model_weights")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif kind == "legacy-pt":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    else:
        torch.save({key: sd, "epoch": 3, "optimizer": {"lr": 0.1}} if key else sd, path)
    code, out, err = run(capsys, "analyze", path, "--csv", tmp_path / "t.csv")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "t.csv")
    expected = htsr.analyze(model)
    if "safetensors" in kind:  # safetensors stores tensors sorted by name, not in the model's order
        expected = expected.set_index("name").loc[sorted(expected["name"])].reset_index()
    assert table["name"].tolist() == expected["name"].tolist() and set(table["name"]) == {"conv", "fc", "emb", "head"}
    assert_rows_match(table, expected)
    assert "model: 4 matrices, 3 analyzed" in out


def test_analyze_options_reach_the_analysis(tmp_path, capsys) -> None:
    model = mixed_model()
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    code, out, err = run(capsys, "analyze", path, "--include", "conv|fc", "--exclude", "^fc$", "--min-evals", "2",
                         "--precision", "float64", "--fit", "exact", "--csv", tmp_path / "a.csv")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "a.csv")
    expected = htsr.analyze(model, include="conv|fc", exclude="^fc$", min_evals=2, precision="float64", fit="exact")
    assert table["name"].tolist() == ["conv"] and set(table["precision"]) == {"float64"}
    assert_rows_match(table, expected)

    code, out, err = run(capsys, "analyze", path, "--ww-compat", "--json", tmp_path / "ww.json")
    assert code == 0, err
    ww = pd.DataFrame(json.loads((tmp_path / "ww.json").read_text()))
    assert_rows_match(ww, htsr.analyze_state_dict(model.state_dict(), ww_compat=True))

    code, out, err = run(capsys, "analyze", path, "--columns", "name,alpha,phase,skip_reason")
    assert code == 0
    assert out.splitlines()[0].split() == ["name", "alpha", "phase", "skip_reason"]
    assert "2 eigenvalues < min_evals=10" in out

    code, out, err = run(capsys, "analyze", path, "--quiet")
    assert code == 0 and err == ""
    assert out.splitlines() == [next(line for line in out.splitlines() if line.startswith("model: "))]


def test_plots_write_one_esd_png_per_analyzed_matrix_and_an_index(tmp_path, capsys) -> None:
    model = mixed_model()
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    code, out, err = run(capsys, "analyze", path, "--plots", tmp_path / "plots")
    assert code == 0, err
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    # head (2 eigenvalues) is skipped: no spectrum; each ESD comes with its fit diagnostics
    assert pngs == ["esd_conv.png", "esd_emb.png", "esd_fc.png", "fit_conv.png", "fit_emb.png", "fit_fc.png"]
    assert all((tmp_path / "plots" / p).read_bytes().startswith(PNG) for p in pngs)
    index = (tmp_path / "plots" / "index.html").read_text()
    assert sorted(set(re.findall(r'src="([^"]+)"', index))) == pngs


# ---------------------------------------------------------------------------------------------- progress


def test_progress_bar_counts_every_matrix_with_elapsed_time_and_eta(tmp_path, capsys) -> None:
    gen = torch.Generator().manual_seed(7)
    sd = {f"blocks.{i}.weight": torch.randn(48, 24, generator=gen) for i in range(40)}
    path = tmp_path / "many.pt"
    torch.save(sd, path)
    code, out, err = run(capsys, "analyze", path, "--progress", "--csv", tmp_path / "many.csv")
    assert code == 0
    final = err.split("\r")[-1].splitlines()[0]  # tqdm's last redraw: "100%|####| 40/40 [00:01<00:00, ...]"
    assert re.search(r"40/40 \[\d\d:\d\d<\d\d:\d\d, .*matrix/s", final), final
    assert_rows_match(pd.read_csv(tmp_path / "many.csv"), htsr.analyze_state_dict(sd))

    # default: no bar when stderr is not a terminal (as under pytest), nor with --no-progress or --quiet
    for argv in ([], ["--no-progress"], ["--quiet"]):
        code, out, err = run(capsys, "analyze", path, *argv)
        assert code == 0 and "40/40" not in err and "\r" not in err

    # the batch budget does not change the numbers
    one_by_one = [r.record["alpha"] for r in analyze_stream(state_dict_matrices(sd), batch_bytes=1)]
    all_at_once = [r.record["alpha"] for r in analyze_stream(state_dict_matrices(sd), batch_bytes=2**30)]
    assert one_by_one == pytest.approx(all_at_once, rel=1e-9)


# ---------------------------------------------------------------------------------------------- bad input


def _random_bytes(p: Path) -> None:
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _truncated_zip(p: Path) -> None:
    torch.save(TinyNet().state_dict(), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _truncated_safetensors(p: Path) -> None:
    save_file(TinyNet().state_dict(), str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])


BAD_FILES = {
    "missing.ckpt": (None, "no such file"),
    "a_directory": (lambda p: p.mkdir(), "no checkpoint in this directory (looked for model.safetensors.index.json"),
    "empty.pt": (lambda p: p.write_bytes(b""), "the file is empty"),
    "random.pt": (_random_bytes, "not a readable checkpoint"),
    "notes.txt": (lambda p: p.write_text("hello, not a checkpoint\n"), "a text file, not a checkpoint"),
    "text.ckpt": (lambda p: p.write_text("epoch=3 step=100\n"), "a text file, not a checkpoint"),
    "truncated.ckpt": (_truncated_zip, "failed finding central directory"),
    "truncated.safetensors": (_truncated_safetensors, "not a valid safetensors file"),
    "a_list.pt": (lambda p: torch.save([torch.zeros(4, 4)], p), "unsupported content: a list of 1 items"),
    "no_tensors.pt": (lambda p: torch.save({"epoch": 3, "lr": 0.1}, p), "a dict without tensors (keys: 'epoch'"),
    "no_matrices.pt": (lambda p: torch.save({"fc.bias": torch.zeros(8), "emb": torch.zeros(8, 8)}, p),
                       "no weight matrices: none of its 2 tensors"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files_exit_2_with_a_clear_message(name, tmp_path, capsys) -> None:
    make, message = BAD_FILES[name]
    path = tmp_path / name
    if make is not None:
        make(path)
    code, out, err = run(capsys, "analyze", path)
    assert code == 2
    assert out == ""
    assert err.startswith(f"lightning-htsr: error: {path}: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_plain_pickle_is_one_line_in_a_real_process(tmp_path) -> None:
    """A pickle written by ``pickle`` (not ``torch.save``): torch's protocol warning does not reach the terminal,
    only the one error line (checked in a subprocess: pytest would capture the warning)."""
    path = tmp_path / "weights.bin"
    path.write_bytes(pickle.dumps({"fc.weight": [[1.0, 2.0]]}, protocol=4))
    out = subprocess.run([sys.executable, "-m", "lightning_htsr", "analyze", str(path)], capture_output=True,
                         text=True)
    assert out.returncode == 2
    assert out.stderr.startswith(f"lightning-htsr: error: {path}: not a readable checkpoint")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("argv, message", [
    (["--include", "fc("], "--include 'fc(': not a valid regular expression"),
    (["--columns", "name,alfa"], "--columns: unknown column(s) alfa"),
    (["--include", "nothing-matches"], "no weight matrix matches --include/--exclude (4 matrices without them)"),
    (["--precision", "float16"], "invalid choice: 'float16'"),
])
def test_bad_options_exit_2(argv, message, tmp_path, capsys) -> None:
    path = tmp_path / "m.pt"
    torch.save(mixed_model().state_dict(), path)
    code, out, err = run(capsys, "analyze", path, *argv)
    assert code == 2 and message in err and "Traceback" not in err


class _Payload:
    """Unpickling this creates a file: what a hostile checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pickled_objects_are_refused_unless_trusted(tmp_path, capsys) -> None:
    model = mixed_model()
    path = tmp_path / "with_hparams.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": argparse.Namespace(lr=0.1)}, path)
    code, out, err = run(capsys, "analyze", path)
    assert code == 2 and out == ""
    assert f"{path}: refusing to unpickle" in err and "argparse.Namespace" in err and "--trust-pickle" in err
    assert "Traceback" not in err

    code, out, err = run(capsys, "analyze", path, "--trust-pickle", "--csv", tmp_path / "t.csv")
    assert code == 0, err
    assert_rows_match(pd.read_csv(tmp_path / "t.csv"), htsr.analyze(model))

    marker = tmp_path / "code_ran"
    hostile = tmp_path / "hostile.pt"
    torch.save({"state_dict": model.state_dict(), "payload": _Payload(marker)}, hostile)
    code, out, err = run(capsys, "analyze", hostile)
    assert code == 2 and "--trust-pickle" in err
    assert not marker.exists()  # nothing was unpickled


# ---------------------------------------------------------------------------------------------- report


def _images(index: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', index.read_text())


def test_report_of_a_run_stopped_by_the_callback(runs, capsys) -> None:
    run_dir = runs["stopped_dir"]
    code, out, err = run(capsys, "report", run_dir)
    assert code == 0, err
    index = run_dir / "htsr_report" / "index.html"
    assert out.strip() == str(index) and index.is_file()
    assert f"history: {run_dir / 'htsr_history.csv'}" in err
    report = index.parent
    for png in ("alpha_history.png", "entropy_history.png", "phase_map.png"):
        assert (report / png).read_bytes().startswith(PNG)
    images = _images(index)
    assert {"alpha_history.png", "entropy_history.png", "phase_map.png"} <= set(images)
    # one ESD per matrix with a spectrum (net.6, 2 x 128, is skipped), all referenced relatively, all present
    assert sorted(i for i in images if i.startswith("esd/")) == ["esd/esd_net.0.png", "esd/esd_net.2.png",
                                                                  "esd/esd_net.4.png"]
    assert all(not os.path.isabs(i) and (report / i).read_bytes().startswith(PNG) for i in images)
    text = index.read_text()
    stopped = text.split('<h2 id="stopped">Stopped</h2>', 1)[1].split("<h2", 1)[0]
    message = runs["stopper"].stopping_reason_message
    assert message and html.escape(message) in stopped
    assert "stopped by HTSRCallback at epoch 0 (global step 8, analysis 1)" in stopped
    # the final-analysis table has the callback's last records
    history = read_history(run_dir / "htsr_history.csv")
    last = history[history["analysis"] == history["analysis"].max()]
    for name, alpha, phase in zip(last["name"], last["alpha"], last["phase"]):
        assert f"<td>{name}</td>" in text or f">{name}</a>" in text
        if alpha == alpha:  # too small to classify: the raw alpha is flagged in parentheses
            assert (f">{alpha:.3f}</td>" if isinstance(phase, str) and phase else f">({alpha:.3f})</td>") in text


def test_report_of_a_log_root_takes_the_newest_run_and_says_so(runs, tmp_path, capsys) -> None:
    code, out, err = run(capsys, "report", runs["root"], "--out", tmp_path / "rep")
    assert code == 0, err
    newest = runs["observed_dir"] / "htsr_history.csv"
    assert f"found 2 history files under {runs['root']}; using the newest: {newest}" in err
    index = tmp_path / "rep" / "index.html"
    assert out.strip() == str(index)
    stopped = index.read_text().split('<h2 id="stopped">Stopped</h2>', 1)[1].split("<h2", 1)[0]
    assert "Not stopped" in stopped
    assert all((index.parent / i).is_file() for i in _images(index))


def test_write_report_reads_json_lines_histories_without_spectra(runs, tmp_path) -> None:
    history = read_history(runs["stopped_dir"] / "htsr_history.csv")
    jsonl = tmp_path / "run" / "htsr_history.jsonl"
    HistoryWriter(jsonl).append(history.to_dict("records"))
    index = write_report(jsonl)
    assert index == jsonl.parent / "htsr_report" / "index.html"  # default: htsr_report/ next to the history
    text = index.read_text()
    assert "No htsr_spectra.npz next to the history" in text
    assert "stopped by HTSRCallback at epoch 0" in text
    assert sorted(_images(index)) == ["alpha_history.png", "entropy_history.png", "phase_map.png"]


def test_report_says_which_analysis_its_spectra_belong_to(tmp_path) -> None:
    """Spectra of an earlier analysis are drawn with that analysis' fits, spectra of an unknown step with the last
    analysis' fits and a note, and a damaged spectra file leaves the rest of the report intact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 96))
    records = htsr.analyze(model).to_dict("records")
    history = tmp_path / "htsr_history.csv"
    writer = HistoryWriter(history)
    for analysis in range(2):
        writer.append([{"analysis": analysis, "epoch": analysis, "global_step": 10 * analysis + 9,
                        "trigger": "epoch_end", **r, "stopping_reason": ""} for r in records])
    spectra = {f"{i}": eigenvalues(m.weight.detach()).numpy() for i, m in enumerate(model)}

    def report(name: str, spectra_file: Path) -> str:
        return write_report(history, tmp_path / name, spectra_path=spectra_file).read_text()

    write_spectra(tmp_path / "earlier.npz", spectra, step=9, epoch=0)
    text = report("earlier", tmp_path / "earlier.npz")
    assert "Spectra of analysis 0 (epoch 0, global step 9)." in text
    assert sorted(i for i in _images(tmp_path / "earlier" / "index.html") if i.startswith("esd/")) == [
        "esd/esd_0.png", "esd/esd_1.png"]
    final = text.split('<h2 id="final">', 1)[1].split("<h2", 1)[0]
    assert "<a href=" not in final  # the final table links only figures of the final analysis

    write_spectra(tmp_path / "unknown.npz", spectra, step=999, epoch=99)
    text = report("unknown", tmp_path / "unknown.npz")
    assert "holds the spectra of step 999 (epoch 99), which is not in the history" in text
    assert "Spectra of analysis" not in text and '<a href="esd/esd_0.png">0</a>' in text

    (tmp_path / "damaged.npz").write_bytes(b"not an npz")
    text = report("damaged", tmp_path / "damaged.npz")
    assert "Could not read damaged.npz" in text and "esd/" not in text
    assert {"alpha_history.png", "entropy_history.png", "phase_map.png"} <= set(_images(tmp_path / "damaged" /
                                                                                       "index.html"))


def test_view_helpers_keep_their_old_import_path() -> None:
    from lightning_htsr.views import html as views
    from lightning_htsr.views import report

    for name in ("esd_figure", "format_value", "html_page", "html_table", "phase_counts", "safe_filename",
                 "save_png"):
        assert getattr(report, name) is getattr(views, name)


def test_report_errors_exit_2(tmp_path, capsys) -> None:
    (tmp_path / "empty_run").mkdir()
    code, out, err = run(capsys, "report", tmp_path / "empty_run")
    assert code == 2 and "no HT-SR history found" in err and "Traceback" not in err
    code, out, err = run(capsys, "report", tmp_path / "nope")
    assert code == 2 and f"{tmp_path / 'nope'}: no such file or directory" in err
    bad = tmp_path / "metrics.csv"
    bad.write_text("epoch,loss\n0,1.0\n")
    code, out, err = run(capsys, "report", bad)
    assert code == 2 and "not an HT-SR history" in err and "Traceback" not in err


def test_usage_errors_and_help(capsys) -> None:
    assert run(capsys, )[0] == 2
    code, out, err = run(capsys, "--help")
    assert code == 0 and "analyze" in out and "report" in out
    code, out, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err


# ---------------------------------------------------------------------------------------------- entry points


def test_console_script_and_module_entry_points(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in mixed_model().state_dict().items()}, str(path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = [[sys.executable, "-m", "lightning_htsr.views.cli", "--help"]]
    script = Path(sys.executable).parent / "lightning-htsr"  # created by `pip install -e .`
    if script.exists():
        commands.append([str(script), "analyze", str(path), "--quiet"])
    # started together: each pays the interpreter's import of torch and lightning (seconds)
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for c in commands]
    results = [(p.returncode, *outputs) for p in procs for outputs in [p.communicate(timeout=120)]]
    code, out, err = results[0]
    assert code == 0, err
    assert out.startswith("usage: lightning-htsr") and "analyze" in out and "report" in out
    if len(results) > 1:
        code, out, err = results[1]
        assert code == 0, err
        assert out.startswith("model: 4 matrices, 3 analyzed") and err == ""
