"""The documentation cannot drift from the code: the site builds without warnings, the README's and the docs' code
examples run, the output they show is what they print, every column and option the docs name exists with the
default they quote, and every local link resolves."""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_htsr import analyze, analyze_checkpoint, analyze_state_dict
from lightning_htsr.records import COLUMNS
from lightning_htsr.spectra.phases import PhaseConfig
from lightning_htsr.training.sinks.history import HISTORY_COLUMNS
from lightning_htsr.training.stopping import StopCriteria
from lightning_htsr.views.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
READMES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
#: A Python block whose first line starts with this marker is a fragment (it names objects defined elsewhere, such
#: as the reader's own model or a 7B checkpoint) and is not run; every other ``python`` block is.
FRAGMENT = "# fragment"


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_docs_site_builds_without_warnings(tmp_path):
    """``make docs``: Sphinx with warnings as errors, from scratch (API reference, CLI reference, every page)."""
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    out = subprocess.run([sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html",
                          str(DOCS), str(tmp_path / "html")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "html" / "index.html").is_file()
    api = (tmp_path / "html" / "api.html").read_text(encoding="utf-8")
    assert "HTSRCallback" in api and "analyze_checkpoint" in api
    cli = (tmp_path / "html" / "cli.html").read_text(encoding="utf-8")
    assert "--trust-pickle" in cli  # generated from the argparse parser


def _python_blocks(path: Path) -> list[tuple[str, str | None]]:
    """The runnable Python blocks of a page, each with the ``text`` block that follows it (its shown output), if
    the prose between them says it is printed."""
    text = _text(path)
    blocks = [(m.group(1), m.group(2), m.start(), m.end()) for m in FENCE.finditer(text)]
    out = []
    for i, (lang, body, _, end) in enumerate(blocks):
        if lang != "python" or body.startswith(FRAGMENT):
            continue
        shown = None
        if i + 1 < len(blocks) and blocks[i + 1][0] == "text":
            between = text[end:blocks[i + 1][2]]
            if re.search(r"prints|summary", between):
                shown = blocks[i + 1][1]
        out.append((body, shown))
    return out


def _runnable() -> list[tuple[Path, str, str | None]]:
    """Each distinct Python block once (the README repeats blocks of the docs), with the output shown after it."""
    seen: dict[str, tuple[Path, str, str | None]] = {}
    for path in [*READMES, *PAGES]:
        for body, shown in _python_blocks(path):
            first = seen.get(body)
            if first is None or (first[2] is None and shown is not None):
                seen[body] = (first[0] if first else path, body, shown)
            elif shown is not None and shown != first[2]:
                seen[body + "\n"] = (path, body, shown)  # the same code shown with another output: check both
    return list(seen.values())


RUNNABLE = _runnable()


def _same_output(shown: str, printed: str, rel_tol: float = 0.05) -> str | None:
    """Why ``shown`` is not in ``printed`` (None when it is): each shown line must be printed, words equal and
    numbers within ``rel_tol`` (the docs say that their outputs are checked within 5 %). Order is not checked:
    stdout and stderr (where Lightning's logger writes) arrive separately."""
    lines = [ln for ln in printed.splitlines() if ln.strip()]
    for want in (ln for ln in shown.splitlines() if ln.strip()):
        if not any(_line_matches(want, got, rel_tol) for got in lines):
            return f"shown line not printed: {want!r}"
    return None


def _line_matches(want: str, got: str, rel_tol: float) -> bool:
    a, b = want.split(), got.split()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        try:
            fx, fy = float(x.strip("(),%")), float(y.strip("(),%"))
        except ValueError:
            if x != y:
                return False
            continue
        if abs(fx - fy) > rel_tol * max(abs(fx), abs(fy), 1e-12):
            return False
    return True


@pytest.mark.parametrize("path,body,shown", RUNNABLE,
                         ids=[f"{_rel(p)}-{b.splitlines()[-1][:30]}" for p, b, _ in RUNNABLE])
def test_code_examples_run_and_print_what_is_shown(path, body, shown, tmp_path):
    """Every Python block of the README and the docs runs as pasted (in a fresh directory and process), and an
    output shown after it is what it prints."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=600)
    assert out.returncode == 0, f"{_rel(path)}: a Python block failed:\n{body}\n{out.stderr[-3000:]}"
    if shown is not None:
        problem = _same_output(shown, out.stdout + out.stderr)
        assert problem is None, f"{_rel(path)}: {problem}\nprinted:\n{out.stdout[-3000:]}"


def _command_outputs() -> list[tuple[Path, str, str]]:
    """Output blocks the docs introduce with "`python examples/... ` prints:", with that command."""
    out = []
    for path in [ROOT / "README.md", *PAGES]:
        for m in re.finditer(r"`(python examples/[^`]+)` prints:\n\n```\w*\n(.*?)^```$", _text(path), re.S | re.M):
            out.append((path, m.group(1), m.group(2)))
    return out


COMMANDS = _command_outputs()


@pytest.mark.parametrize("path,command,shown", COMMANDS, ids=[c for _, c, _ in COMMANDS])
def test_example_commands_print_what_is_shown(path, command, shown, tmp_path):
    """A command's output shown in the docs is what the command prints now (numbers within 5 %)."""
    args = command.split()[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    problem = _same_output(shown, out.stdout + out.stderr)
    assert problem is None, f"{_rel(path)}: `{command}`: {problem}\nprinted:\n{out.stdout[-3000:]}"


def test_readme_first_snippet_is_a_complete_script():
    body, _ = _python_blocks(ROOT / "README.md")[0]
    assert "HTSRCallback()" in body and "trainer.fit(" in body and "class " in body


def test_glossary_lists_every_column():
    glossary = _text(DOCS / "concepts" / "glossary.md")
    missing = [c for c in (*COLUMNS, *HISTORY_COLUMNS) if f"`{c}`" not in glossary]
    assert not missing, f"columns without a glossary entry: {missing}"


def _signature_defaults() -> dict[str, object]:
    """Parameter defaults of the front doors, as the docs quote them (``name=value``)."""
    from lightning_htsr import HTSRCallback

    defaults: dict[str, object] = {}
    for fn in (HTSRCallback.__init__, analyze, analyze_state_dict, analyze_checkpoint):
        for p in inspect.signature(fn).parameters.values():
            if p.default is not inspect.Parameter.empty:
                defaults.setdefault(p.name, p.default)
    for name, field in PhaseConfig.__dataclass_fields__.items():
        defaults.setdefault(name, field.default)
    defaults["patience"] = StopCriteria().settle_patience  # None in the signature: 7 epochs for the default rule
    return defaults


#: ``name=value`` spans that set an option to something other than its default, on purpose (the text turns a
#: feature on or shows an alternative, and says so); every other quoted ``name=value`` must be the default.
NOT_DEFAULTS = {
    "restore_best_weights=True", "restore_best_weights=False", "stop_on_over_trained=True", "print_summary=False",
    "background_figures=False", "ww_compat=True", "randomize=True", "progress=True", "detect_overfitting=False",
    "precision=\"float64\"", "fit=\"exact\"", "stop_on=None", "device=\"cuda\"", "backend=\"cupy\"",
    "stop_rule=\"phase_fraction\"", "monitor=\"val_loss\"", "monitor=\"val_acc\"", "monitor_mode=\"max\"",
    "fix_fingers=\"clip_xmax\"", "fix_fingers=\"xmin_peak\"",
    "trust_pickle=True", "stop_on=\"heavy_tailed\"", "log_fit_diagnostics=True", "fit=\"TPL\"",
    "lora=\"delta\"", "lora=\"base\"", "reuse_unchanged=False",
}
SPAN = re.compile(r"`(\w+)=([^`,()]+)`")


def _quoted(value: str) -> object:
    try:
        return eval(value, {}, {})  # noqa: S307 - literals from our own docs
    except Exception:
        return value


def test_quoted_defaults_match_the_code():
    """A ``name=value`` the README or the docs quote for an option of the callback, the analysis front doors or
    ``PhaseConfig`` is its default in the code (the callback reference once said ``patience=6`` for 7)."""
    defaults = _signature_defaults()
    wrong = []
    for path in [*READMES, *PAGES]:
        for n, line in enumerate(_text(path).splitlines(), 1):
            for name, value in SPAN.findall(line):
                if name not in defaults or f"{name}={value}" in NOT_DEFAULTS or "|" in value or "..." in value:
                    continue
                if _quoted(value) != defaults[name]:
                    wrong.append(f"{_rel(path)}:{n}: `{name}={value}` but the default is {defaults[name]!r}")
    assert not wrong, "\n".join(wrong)


def _cli_options() -> set[str]:
    options: set[str] = set()
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            options.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return options


#: Options on command lines of the docs that are not ``lightning-htsr``'s own.
OTHER_TOOLS = {"--nproc-per-node", "--logdir", "--trainer.callbacks.help", "--plot"}  # torchrun, tensorboard,
# LightningCLI; `--plot` is quoted as an error ("no abbreviations")


def test_command_line_options_in_the_docs_exist():
    """Every ``--option`` on a ``lightning-htsr`` command line or in the offline guide is one of the parser's."""
    known = _cli_options()
    unknown = []
    for path in [ROOT / "README.md", *PAGES]:
        for n, line in enumerate(_text(path).splitlines(), 1):
            if "lightning-htsr " in line or "-m lightning_htsr" in line or path.name == "offline.md":
                for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9.-]*[a-z0-9])", line):
                    if opt not in known and opt not in OTHER_TOOLS:
                        unknown.append(f"{_rel(path)}:{n}: {opt}")
    assert not unknown, "\n".join(unknown)


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", [*READMES, *PAGES], ids=_rel)
def test_local_links_resolve(path):
    """Every relative link (to a file, a page or an image) points at a file of the repository."""
    broken = []
    for target in LINK.findall(_text(path)):
        if re.match(r"^(https?:|mailto:|#)", target):
            continue
        file = (path.parent / target.split("#")[0]).resolve()
        if not file.exists():
            broken.append(target)
    assert not broken, f"{_rel(path)}: broken links {broken}"
