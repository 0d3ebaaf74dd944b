"""End to end: a real Lightning run with ``HTSRCallback`` read back through a real ``tensorboard`` server's HTTP API.

The other TensorBoard tests read the event files with ``EventAccumulator``; this one starts the ``tensorboard``
program a user would run (default data loader, the Rust data server where installed) on 127.0.0.1 and checks that
what the dashboards are served (scalar tags, steps and values, the custom-scalars layout, histograms, images,
text) is exactly what the callback computed. Endpoints (TensorBoard 2.x, ``tensorboard/plugins/*``):
``/data/runs``, ``/data/plugin/scalars/tags``, ``/data/plugin/scalars/scalars?run=&tag=``,
``/data/plugin/custom_scalars/layout``, ``/data/plugin/custom_scalars/scalars?run=&tag=<regex>``,
``/data/plugin/{histograms,images,text}/tags``, ``/data/plugin/histograms/histograms``,
``/data/plugin/images/images`` and ``/data/plugin/images/individualImage``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from conftest import TinyNet, trainer_kwargs
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_htsr import HTSRCallback, Phase
from lightning_htsr.training.sinks import read_history
from lightning_htsr.training.sinks.scalars import MATRIX_SCALARS
from lightning_htsr.training.sinks.tensorboard import dashboard_layout

STARTUP_TIMEOUT = 90.0  # seconds: importing tensorboard on a loaded 2-core machine can take a while
POLL = 0.1
EPOCHS = 3
STEPS_PER_EPOCH = 8  # TinyNet: 64 samples, batch size 8


def tensorboard_command() -> list[str] | None:
    """The ``tensorboard`` program next to this interpreter, else ``python -m tensorboard.main``; ``None``: absent."""
    exe = Path(sys.executable).with_name("tensorboard")
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    if importlib.util.find_spec("tensorboard") is not None and importlib.util.find_spec("tensorboard.main"):
        return [sys.executable, "-m", "tensorboard.main"]
    found = shutil.which("tensorboard")
    return [found] if found else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A running ``tensorboard`` process and a tiny JSON client for its data API."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path) -> None:
        self.proc, self.port, self.log_path = proc, port, log_path
        self.base = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def raw(self, path: str, params: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
            timeout: float = 30.0) -> bytes:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        body = urllib.parse.urlencode(data, doseq=True).encode() if data is not None else None
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=timeout) as response:
            return response.read()

    def get(self, path: str, **params: Any) -> Any:
        return json.loads(self.raw(path, params or None))

    def post(self, path: str, data: dict[str, Any]) -> Any:
        return json.loads(self.raw(path, data=data))

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:  # the whole process group: tensorboard and its data server child
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def start_server(command: list[str], logdir: str, workdir: Path, attempts: int = 3) -> Server:
    """Start tensorboard on a free port and wait until its HTTP API answers (retry if the port got taken)."""
    last_log = ""
    for attempt in range(attempts):
        port = free_port()
        log_path = workdir / f"tensorboard_{attempt}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [*command, "--logdir", logdir, "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        server = Server(proc, port, log_path)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    server.get("/data/runs")
                    return server
                except (urllib.error.URLError, ConnectionError, OSError, json.JSONDecodeError):
                    time.sleep(POLL)
        except BaseException:
            server.stop()
            raise
        server.stop()
        last_log = server.log()
        if "already in use" not in last_log.lower():
            break
    raise AssertionError(f"tensorboard did not answer within {STARTUP_TIMEOUT:.0f} s; its output:\n{last_log}")


def wait_until_loaded(server: Server, run: str, tag: str, last_step: int) -> None:
    """Poll until the server has read the whole run (the last analysis' step of ``tag``) or time runs out."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if run in server.get("/data/runs") and tag in server.get("/data/plugin/scalars/tags").get(run, {}):
                series = server.get("/data/plugin/scalars/scalars", run=run, tag=tag)
                if series and series[-1][1] >= last_step:
                    return
        except (urllib.error.URLError, ConnectionError, OSError, json.JSONDecodeError):
            pass  # e.g. a 404 for the tag while the first load is still under way
        time.sleep(POLL)
    # fall through: the assertions below then say what is missing


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def command() -> list[str]:
    cmd = tensorboard_command()
    if cmd is None:
        pytest.skip("the tensorboard program / module is not installed")
    return cmd


@pytest.fixture(scope="module")
def run(tmp_path_factory, command) -> dict[str, Any]:
    """A short real training run (SGD, lr > 0) with HTSRCallback and a TensorBoardLogger."""
    root = tmp_path_factory.mktemp("tb_server")
    save_dir = root / "logs"
    logger = TensorBoardLogger(str(save_dir), name="tb")
    callback = HTSRCallback(log_figures_every=2)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(root, logger=logger, max_epochs=EPOCHS))
    trainer.fit(TinyNet(lr=0.05))
    history = read_history(callback.history_path)
    return {"root": root, "save_dir": str(save_dir), "logger": logger, "callback": callback, "trainer": trainer,
            "history": history, "run": Path(os.path.relpath(logger.log_dir, save_dir)).as_posix()}


@pytest.fixture(scope="module")
def server(run, command):
    srv = start_server(command, run["save_dir"], run["root"])
    try:
        wait_until_loaded(srv, run["run"], "htsr/alpha_mean", int(run["trainer"].global_step))
        yield srv
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------------- tests


def test_server_serves_the_callbacks_scalars_at_the_analysis_steps(run, server) -> None:
    name, history, trainer = run["run"], run["history"], run["trainer"]
    assert server.get("/data/runs") == [name]
    steps = [0] + [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    assert sorted(history["global_step"].unique()) == steps
    assert trainer.global_step == steps[-1]

    tags = {t for t in server.get("/data/plugin/scalars/tags")[name] if t.startswith("htsr/")}
    # exactly the keys the callback published (all analyses log the same keys)
    assert tags == {k for k in trainer.callback_metrics if k.startswith("htsr/")}
    for matrix in ("net.0", "net.2", "net.4"):
        # net.0 (32 eigenvalues) is too small to classify: its raw alpha is logged apart from the findings
        for metric in ("alpha" if matrix != "net.0" else "alpha_unclassified", "entropy", "phase", "smoothed_phase"):
            assert f"htsr/{matrix}/{metric}" in tags, (matrix, metric)
    assert not any(t.startswith("htsr/net.6/") for t in tags)  # 2 eigenvalues: skipped by min_evals, no scalars
    for key in ("alpha_mean", "entropy_mean", "frac_heavy_tailed", "num_valid", "compute_seconds"):
        assert f"htsr/{key}" in tags

    series = {tag: server.get("/data/plugin/scalars/scalars", run=name, tag=tag) for tag in sorted(tags)}
    for tag, points in series.items():
        assert [step for _, step, _ in points] == steps, tag

    # per-matrix values = the history file (full precision) to float32 precision, at every analysis
    checked = 0
    for row in history.itertuples(index=False):
        step = int(row.global_step)
        if row.status == "skipped":
            continue  # no spectrum: nothing logged (checked above)
        classified = isinstance(row.phase, str) and bool(row.phase)
        for metric in MATRIX_SCALARS:
            value = getattr(row, metric)
            tag = f"htsr/{row.name}/{metric if metric != 'alpha' or classified else 'alpha_unclassified'}"
            if isinstance(value, float) and not math.isfinite(value):
                assert tag not in tags or step not in [s for _, s, _ in series[tag]], tag
                continue
            served = dict((s, v) for _, s, v in series[tag])[step]
            assert served == pytest.approx(float(value), rel=2e-7, abs=1e-30), (tag, step)
            checked += 1
        for column in ("phase", "smoothed_phase"):  # the same names as the history's columns
            phase = getattr(row, column)  # NaN where analyzed but too small to classify: code -1
            expected_code = Phase(phase).code if isinstance(phase, str) and phase else -1
            served = dict((s, v) for _, s, v in series[f"htsr/{row.name}/{column}"])[step]
            assert served == expected_code, (row.name, column, step)
    assert checked >= 3 * 2 * len(steps)

    # model-level means = mean over the classified matrices of each analysis (the set frac_<phase> counts)
    for step, rows in history.groupby("global_step"):
        ok = rows[(rows["status"] == "success") & rows["phase"].notna()]
        served = dict((s, v) for _, s, v in series["htsr/alpha_mean"])
        assert served[int(step)] == pytest.approx(ok["alpha"].mean(), rel=2e-7), step
        served = dict((s, v) for _, s, v in series["htsr/entropy_mean"])
        assert served[int(step)] == pytest.approx(ok["entropy"].mean(), rel=2e-7), step

    # the last point of every tag = what the callback holds now (callback_metrics, latest_records)
    for tag, points in series.items():
        assert points[-1][2] == pytest.approx(float(trainer.callback_metrics[tag]), rel=2e-7, abs=1e-30), tag
    for record in run["callback"].latest_records:
        if record["status"] == "skipped":
            continue
        key = "alpha" if record["phase"] else "alpha_unclassified"
        assert series[f"htsr/{record['name']}/{key}"][-1][2] == pytest.approx(record["alpha"], rel=2e-7)
        assert series[f"htsr/{record['name']}/entropy"][-1][2] == pytest.approx(record["entropy"], rel=2e-7)

    # the multi-run endpoint (POST, what the newer scalar cards use) serves the same points
    multi = server.post("/data/plugin/scalars/scalars_multirun", {"tag": "htsr/net.2/alpha", "runs": [name]})
    assert multi[name] == series["htsr/net.2/alpha"]


def test_server_serves_the_custom_scalars_dashboard(run, server) -> None:
    name = run["run"]
    layout = server.get("/data/plugin/custom_scalars/layout")
    expected = dashboard_layout("htsr")
    assert [c["title"] for c in layout["category"]] == list(expected)
    for category in layout["category"]:
        charts = expected[category["title"]]
        assert [c["title"] for c in category["chart"]] == list(charts)
        for chart in category["chart"]:
            assert chart["multiline"]["tag"] == charts[chart["title"]][1]
    # the dashboard's regex query finds every per-matrix alpha, at every analysis step
    payload = server.get("/data/plugin/custom_scalars/scalars", run=name, tag=r"^htsr/.+/alpha$")
    assert payload["regex_valid"]
    assert set(payload["tag_to_events"]) == {"htsr/net.2/alpha", "htsr/net.4/alpha"}  # net.0: unclassified
    steps = sorted(run["history"]["global_step"].unique())
    for tag, points in payload["tag_to_events"].items():
        assert [p[1] for p in points] == steps, tag


def test_server_lists_histograms_images_and_text(run, server) -> None:
    name = run["run"]
    steps = sorted(run["history"]["global_step"].unique())
    histograms = server.get("/data/plugin/histograms/tags")[name]
    assert set(histograms) == {f"htsr/{m}/log10_eigenvalues" for m in ("net.0", "net.2", "net.4")}
    hist = server.get("/data/plugin/histograms/histograms", run=name, tag="htsr/net.2/log10_eigenvalues")
    assert [h[1] for h in hist] == steps
    # buckets [left, right, count]: 256 eigenvalues of the 256 x 256 matrix at every analysis
    assert all(sum(b[2] for b in h[2]) == pytest.approx(256) for h in hist)

    images = server.get("/data/plugin/images/tags")[name]
    assert {"htsr/phase_map", "htsr/net.2/esd", "htsr/net.4/esd"} <= set(images)
    phase_map = server.get("/data/plugin/images/images", run=name, tag="htsr/phase_map")
    assert [i["step"] for i in phase_map] == steps  # drawn at every analysis
    esd = server.get("/data/plugin/images/images", run=name, tag="htsr/net.2/esd")
    assert [i["step"] for i in esd] == steps[::2]  # log_figures_every=2: analyses 0 and 2
    png = server.raw("/data/plugin/images/individualImage?" + phase_map[-1]["query"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000

    text = server.get("/data/plugin/text/tags")[name]
    assert {"htsr/latest/text_summary", "htsr/phase_legend/text_summary"} <= set(text)
