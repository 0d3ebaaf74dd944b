"""Screenshot the TensorBoard UI over an ``HTSRCallback`` run into docs/tensorboard*.png.

Starts a real ``tensorboard`` server on 127.0.0.1 (a free port) over ``--logdir`` and captures its dashboards with
headless Chromium (Debian's ``chromium`` package: ``apt-get install -y chromium``), driven over the DevTools
protocol on a pipe (``--remote-debugging-pipe``, standard library only): each view is captured once its charts
exist and two consecutive frames are identical. Without ``--logdir`` it first trains a small model to have
something to show: an MLP 64 -> 512 -> 512 -> 10 on scikit-learn's 8x8 digits (SGD with momentum, batch 16), with
``HTSRCallback`` and a ``TensorBoardLogger`` writing to ``<workdir>/htsr_runs``.

Views (``--views``, default all three):

* ``scalars`` -> ``--out`` (docs/tensorboard.png): the Scalars dashboard filtered to
  ``htsr/(alpha_mean|entropy_mean|frac_heavy_tailed|.*/alpha)$``, no smoothing, outliers not clipped: the mean
  alpha, mean entropy, share of heavy-tailed matrices and the alpha of every matrix over training.
* ``custom_scalars`` -> docs/tensorboard_custom_scalars.png: the dashboard layout the callback writes (its alpha,
  entropy and phase categories, with the legends opened).
* ``images`` -> docs/tensorboard_images.png: the Images dashboard at actual image size: the ESD of one matrix
  (``--esd-matrix``) with its power-law and Marchenko-Pastur fits, and the phase map (phase per matrix and
  analysis).

The server (and its data-server child) and Chromium are stopped at the end, also on errors. PNGs are re-encoded
with a palette (Pillow) to stay well under 500 kB.

Usage:
  python scripts/tensorboard_screenshot.py [--logdir DIR] [--out docs/tensorboard.png] [--views scalars,images]
      [--epochs 20] [--workdir DIR] [--size 1600x700] [--max-height 1800] [--esd-matrix net.2]
      [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio", "--disable-extensions", "--disable-default-apps",
                  "--force-device-scale-factor=1"]
IMAGES_LOADED = ("const loaders = deepAll(document, 'tf-image-loader'); return loaders.length > 0 && loaders.every("
                 "l => { const img = l.shadowRoot && l.shadowRoot.querySelector('img'); "
                 "return !!img && img.complete && img.naturalWidth > 0; });")
SCALARS_FILTER = r"htsr/(alpha_mean|entropy_mean|frac_heavy_tailed|.*/alpha)$"


def hash_url(base: str, plugin: str, **params: str) -> str:
    """``http://host:port/#plugin&key=value``: the legacy dashboards keep their settings in the URL fragment."""
    return f"{base}/#{plugin}" + "".join(f"&{k}={urllib.parse.quote(v, safe='')}" for k, v in params.items())


# Each view: default file name, URL, a JS condition the page must meet first (``deep``/``deepAll`` search through
# shadow roots), JS run once it does (settings the URL cannot carry), and JS giving the bottom (px) of what to keep:
# the page is laid out in a tall viewport and the screenshot clipped there.
VIEWS = {
    "scalars": {
        "file": "tensorboard.png",
        "url": lambda base, esd_tag: hash_url(base, "scalars", _smoothingWeight="0", tagFilter=SCALARS_FILTER),
        "ready": "return deepAll(document, 'tf-scalar-card').length > 0;",
        "setup": "deep(document, 'tf-scalar-dashboard')._ignoreYOutliers = false;",
        "bottom": "return deep(document, 'tf-category-paginated-view').getBoundingClientRect().bottom;",
    },
    "custom_scalars": {
        "file": "tensorboard_custom_scalars.png",
        "url": lambda base, esd_tag: hash_url(base, "custom_scalars", _smoothingWeight="0"),
        "ready": "return deepAll(document, 'tf-custom-scalar-multi-line-chart-card').length > 0;",
        "setup": "deep(document, 'tf-custom-scalar-dashboard')._ignoreYOutliers = false; "
                 "for (const card of deepAll(document, 'tf-custom-scalar-multi-line-chart-card')) "
                 "card._matchesListOpened = true;",  # the legend: which marker is which matrix
        # the alpha, entropy and phase categories (the rank one would make a very tall picture)
        "bottom": "const panes = deepAll(document, 'tf-category-paginated-view'); "
                  "return panes.length ? panes[Math.min(2, panes.length - 1)].getBoundingClientRect().bottom : null;",
    },
    "images": {
        "file": "tensorboard_images.png",
        "url": lambda base, esd_tag: hash_url(base, "images", tagFilter=f"^({re.escape(esd_tag)}|htsr/phase_map)$"),
        "ready": IMAGES_LOADED,
        "setup": "deep(document, 'tf-image-dashboard')._actualSize = true;",
        "bottom": "return deep(document, 'tf-category-paginated-view').getBoundingClientRect().bottom;",
    },
}


# ------------------------------------------------------------------------------------------------ training


def train_digits(save_dir: Path, epochs: int, seed: int = 0) -> Path:
    """Train the MLP on sklearn's digits with HTSRCallback + TensorBoardLogger; return the run's log dir."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_htsr import HTSRCallback

    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, val = perm[:1500], perm[1500:]

    class DigitsMLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                     nn.Linear(512, 10))

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            inputs, target = batch
            loss = nn.functional.cross_entropy(self(inputs), target)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            inputs, target = batch
            logits = self(inputs)
            self.log("val_loss", nn.functional.cross_entropy(logits, target))
            self.log("val_acc", (logits.argmax(-1) == target).float().mean())

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    train_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=16, shuffle=True)
    val_loader = DataLoader(TensorDataset(x[val], y[val]), batch_size=256)
    logger = TensorBoardLogger(str(save_dir), name="digits_mlp")
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger,
                         callbacks=[HTSRCallback(log_figures_every=5)], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=20)
    start = time.perf_counter()
    trainer.fit(DigitsMLP(), train_loader, val_loader)
    acc = float(trainer.callback_metrics.get("val_acc", float("nan")))
    alpha = float(trainer.callback_metrics.get("htsr/alpha_mean", float("nan")))
    print(f"trained {epochs} epochs in {time.perf_counter() - start:.0f} s: val_acc {acc:.3f}, "
          f"htsr/alpha_mean {alpha:.2f}; logs in {logger.log_dir}")
    return Path(logger.log_dir)


# ------------------------------------------------------------------------------------------------- server


def tensorboard_command() -> list[str]:
    exe = Path(sys.executable).with_name("tensorboard")
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    found = shutil.which("tensorboard")
    return [found] if found else [sys.executable, "-m", "tensorboard.main"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str, timeout: float = 10.0):  # noqa: ANN201
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class TensorBoardServer:
    def __init__(self, logdir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # run from the log dir's parent with a relative --logdir: the sidebar then shows "htsr_runs", not a temp path
        logdir = logdir.resolve()
        cmd = [*tensorboard_command(), "--logdir", logdir.name, "--host", "127.0.0.1", "--port", str(self.port),
               "--reload_interval", "2"]
        print(f"starting (in {logdir.parent}):", " ".join(cmd))
        with open(log_path, "wb") as log_file:
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=logdir.parent, start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """Wait until the server answers and lists htsr scalars; return ``{run: [tags]}``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited ({self.proc.returncode}):\n{self.log_path.read_text()}")
            try:
                tags = get_json(self.base + "/data/plugin/scalars/tags")
                if any(any(t.startswith("htsr/") for t in run_tags) for run_tags in tags.values()):
                    return tags
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"tensorboard did not serve htsr scalars within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        print(f"stopped tensorboard (pid {self.proc.pid})")


def pick_esd_tag(base: str, matrix: str) -> str:
    """``htsr/<matrix>/esd`` if the server lists it, else the first ESD image tag (or that name anyway)."""
    wanted = f"htsr/{matrix}/esd"
    try:
        listed = sorted({t for tags in get_json(base + "/data/plugin/images/tags").values() for t in tags
                         if t.startswith("htsr/") and t.endswith("/esd")})
    except (urllib.error.URLError, OSError, ValueError):
        listed = []
    return wanted if wanted in listed or not listed else listed[0]


# ------------------------------------------------------------------------------------------------ capture

DEEP_QUERY = """(() => {
  const deep = (root, sel) => {
    const hit = root.querySelector(sel);
    if (hit) return hit;
    for (const el of root.querySelectorAll('*')) {
      if (el.shadowRoot) { const x = deep(el.shadowRoot, sel); if (x) return x; }
    }
    return null;
  };
  const deepAll = (root, sel, out = []) => {
    out.push(...root.querySelectorAll(sel));
    for (const el of root.querySelectorAll('*')) if (el.shadowRoot) deepAll(el.shadowRoot, sel, out);
    return out;
  };
  %s
})()"""


def _high_fd(fd: int, minimum: int = 10) -> int:
    """A duplicate of ``fd`` numbered ``>= minimum`` (the original is closed)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, minimum)
    os.close(fd)
    return high


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fd 3 in, fd 4 out, NUL-separated JSON)."""

    def __init__(self, executable: str, width: int, height: int) -> None:
        self.profile = tempfile.mkdtemp(prefix="chromium_profile_")
        to_chrome_r, self._to_chrome_w = os.pipe()
        self._from_chrome_r, from_chrome_w = os.pipe()
        # bash maps them to fds 3 and 4: move the child's ends above 9 first, or `3<&4 4>&3` would swap them
        to_chrome_r, from_chrome_w = (_high_fd(fd) for fd in (to_chrome_r, from_chrome_w))
        args = [executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                "--remote-debugging-pipe", "about:blank"]
        print("browser:", " ".join(args))
        shell = "exec " + " ".join(map(shlex.quote, args)) + f" 3<&{to_chrome_r} 4>&{from_chrome_w}"
        bash = shutil.which("bash") or "/bin/bash"  # dash (Debian's sh) rejects fd numbers above 9
        self.proc = subprocess.Popen([bash, "-c", shell], pass_fds=(to_chrome_r, from_chrome_w),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._id = 0
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.resize(width, height)
        except BaseException:
            self.close()
            raise

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                if not select.select([self._from_chrome_r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise TimeoutError(f"chromium did not answer {method} within {timeout:.0f} s")
                chunk = os.read(self._from_chrome_r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the DevTools pipe (exit {self.proc.poll()})")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:  # events (no id) are skipped
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def page(self, method: str, params: dict | None = None) -> dict:
        return self.send(method, params, self.session)

    def resize(self, width: int, height: int) -> None:
        self.page("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def evaluate(self, body: str):  # noqa: ANN201 - a JSON value
        result = self.page("Runtime.evaluate", {"expression": DEEP_QUERY % body, "returnByValue": True})
        return result.get("result", {}).get("value")

    def screenshot(self, width: int, height: int) -> bytes:
        clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
        return base64.b64decode(self.page("Page.captureScreenshot", {"format": "png", "clip": clip})["data"])

    def capture(self, url: str, view: dict, width: int, min_height: int, max_height: int, timeout: float = 120.0,
                settle: float = 1.5) -> tuple[bytes, int]:
        """Load ``url`` in a ``width x max_height`` viewport, wait for the view's condition, apply its settings, and
        shoot (clipped to the view's bottom, at least ``min_height``) once two frames in a row agree."""
        self.resize(width, max_height)
        self.page("Page.navigate", {"url": "about:blank"})  # a fresh document: a new #fragment alone does not reload
        time.sleep(0.2)
        self.page("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout
        setup_done = False
        previous: tuple[int, bytes] | None = None
        while True:
            if time.monotonic() > deadline:
                if previous is None:
                    raise RuntimeError(f"the page never met {view['ready']!r}: {url}")
                return previous[1], previous[0]
            if not self.evaluate(view["ready"]):
                time.sleep(0.3)
                continue
            if not setup_done and view.get("setup"):
                self.evaluate(view["setup"])  # may load more (images at actual size): wait for `ready` again
                setup_done = True
                time.sleep(0.3)
                continue
            time.sleep(settle)
            bottom = self.evaluate(view["bottom"]) if view.get("bottom") else None
            height = max_height if not bottom else int(min(max(bottom + 12, min_height), max_height))
            frame = (height, self.screenshot(width, height))
            if frame == previous:
                return frame[1], frame[0]
            previous = frame

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
            self.proc.wait(timeout=15)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        for fd in (self._to_chrome_w, self._from_chrome_r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


def save_png(png: bytes, out: Path, colors: int = 256) -> None:
    """Re-encode with an adaptive palette (charts have few colours): a few hundred kB -> well under 500 kB."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        import io

        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        out.write_bytes(png)
        return
    with Image.open(io.BytesIO(png)) as img:
        img.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logdir", type=Path, help="TensorBoard log dir to show (default: train the digits MLP)")
    parser.add_argument("--out", type=Path, default=DOCS / VIEWS["scalars"]["file"],
                        help="scalars screenshot; the other views go next to it as tensorboard_<view>.png")
    parser.add_argument("--views", default=",".join(VIEWS), help=f"comma-separated subset of {','.join(VIEWS)}")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the digits run (without --logdir)")
    parser.add_argument("--workdir", type=Path, help="where the digits run goes (default: a temp dir, removed)")
    parser.add_argument("--size", default="1600x700", help="browser width and minimum height, WIDTHxHEIGHT")
    parser.add_argument("--max-height", type=int, default=1800, help="tallest screenshot (px)")
    parser.add_argument("--esd-matrix", default="net.2",
                        help="matrix whose ESD figure the images view shows (default: the digits MLP's 512 x 512 "
                             "hidden matrix; the first ESD logged when absent)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)

    views = [v.strip() for v in args.views.split(",") if v.strip()]
    unknown = sorted(set(views) - set(VIEWS))
    if unknown:
        parser.error(f"unknown views {unknown}; choose from {list(VIEWS)}")
    if not Path(args.chromium).exists():
        parser.error(f"no chromium at {args.chromium} (apt-get install -y chromium)")
    width, height = (int(v) for v in args.size.lower().split("x"))

    temp = None
    if args.logdir is None:
        workdir = args.workdir or Path(temp := tempfile.mkdtemp(prefix="htsr_tb_"))
        logdir = workdir / "htsr_runs"
        train_digits(logdir, args.epochs)
    else:
        logdir = args.logdir
    server = TensorBoardServer(logdir, Path(tempfile.gettempdir()) / f"tensorboard_screenshot_{os.getpid()}.log")
    browser = None
    try:
        tags = server.wait_ready()
        for run, run_tags in tags.items():
            print(f"run {run!r}: {sum(t.startswith('htsr/') for t in run_tags)} htsr scalar tags")
        esd_tag = pick_esd_tag(server.base, args.esd_matrix)
        browser = Chromium(args.chromium, width, height)
        for name in views:
            view = VIEWS[name]
            out = args.out if name == "scalars" else args.out.with_name(view["file"])
            url = view["url"](server.base, esd_tag)
            print(f"capturing {name}: {url}")
            png, shot_height = browser.capture(url, view, width, height, args.max_height)
            save_png(png, out)
            print(f"wrote {out} ({out.stat().st_size / 1024:.0f} kB, {width}x{shot_height})")
    finally:
        if browser is not None:
            browser.close()
        server.stop()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
