"""The pure pieces behind the callback: schedule, stop rule, scalar keys, history/spectra files, work sharing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_htsr.distributed import assign_owners, matrix_cost
from lightning_htsr.spectra.phases import Phase
from lightning_htsr.training.schedule import AnalysisSchedule
from lightning_htsr.training.sinks import (
    HISTORY_COLUMNS,
    HistoryWriter,
    read_history,
    read_spectra,
    scalar_metrics,
    write_spectra,
)
from lightning_htsr.training.sinks.scalars import phase_legend
from lightning_htsr.training.sinks.tensorboard import dashboard_layout, results_table, tensorboard_writer
from lightning_htsr.training.stopping import (
    Anchor,
    StopCriteria,
    StopDecision,
    StopReason,
    StopState,
    evaluate_stop,
    over_trained,
    phase_fraction,
    replay_stop,
)
from lightning_htsr.weights.modules import weight_matrices

# ---------------------------------------------------------------------------------------------- schedule


def test_schedule_every_n_epochs_and_explicit_list() -> None:
    assert [e for e in range(7) if AnalysisSchedule(every_n_epochs=3).epoch_due(e)] == [2, 5]
    assert [e for e in range(7) if AnalysisSchedule(every_n_epochs=0).epoch_due(e)] == []
    explicit = AnalysisSchedule(every_n_epochs=1, epochs=[0, 5])
    assert [e for e in range(7) if explicit.epoch_due(e)] == [0, 5]


def test_schedule_steps() -> None:
    s = AnalysisSchedule(every_n_steps=50)
    assert [t for t in range(0, 201, 10) if s.step_due(t)] == [50, 100, 150, 200]
    assert not AnalysisSchedule().step_due(100)


@pytest.mark.parametrize("kwargs", [{"every_n_epochs": -1}, {"every_n_steps": 0}, {"epochs": [-2]}])
def test_schedule_rejects_nonsense(kwargs) -> None:
    with pytest.raises(ValueError):
        AnalysisSchedule(**kwargs)


# -------------------------------------------------------------------------------------------- stop rule

RECORDS = [{"name": "a", "alpha": 1.8}, {"name": "b", "alpha": 3.0}, {"name": "c", "alpha": 9.0},
           {"name": "d", "alpha": math.nan}]
PHASES = {"a": "heavy_tailed", "b": "heavy_tailed", "c": "random_like", "d": None}


def test_phase_fraction_ignores_unclassified() -> None:
    assert phase_fraction(PHASES, "heavy_tailed") == (2 / 3, 3)
    fraction, classified = phase_fraction({"x": None}, "heavy_tailed")
    assert math.isnan(fraction) and classified == 0


def _run(crit: StopCriteria, analyses, state: StopState | None = None) -> tuple[list[bool], StopState, StopDecision]:
    """Feed ``(records, phases, epoch)`` analyses to the rule; the stop flags, the last state and decision."""
    state, flags, decision = state or StopState(), [], StopDecision(False)
    for records, phases, epoch in analyses:
        decision, state = evaluate_stop(crit, state, records, phases, epoch=epoch)
        flags.append(decision.should_stop)
    return flags, state, decision


def test_phase_fraction_rule_needs_fraction_patience_and_min_epochs() -> None:
    crit = StopCriteria(stop_on="heavy_tailed", rule="phase_fraction", stop_fraction=0.6, patience=2, min_epochs=3)
    flags, state, _ = _run(crit, [(RECORDS, PHASES, 5)])
    assert flags == [False] and state.wait_count == 1
    flags, state, _ = _run(crit, [(RECORDS, PHASES, 1)], state)
    assert flags == [False] and state.wait_count == 2  # patience met, but epoch 1 < min_epochs 3
    flags, state, decision = _run(crit, [(RECORDS, PHASES, 3)], state)
    assert flags == [True] and decision.reason is StopReason.PHASE_FRACTION and "67% of 3 classified" in decision.message
    # a non-qualifying analysis resets the streak
    assert _run(crit, [(RECORDS, {"a": "random_like"}, 9)], state)[1].wait_count == 0
    strict = StopCriteria(stop_on="heavy_tailed", rule="phase_fraction", stop_fraction=0.9)
    assert _run(strict, [(RECORDS, PHASES, 9)])[0] == [False]


def _recs(**alphas_entropies: tuple[float, float]) -> list[dict]:
    return [{"name": n, "alpha": a, "entropy": e} for n, (a, e) in alphas_entropies.items()]


def test_settled_rule_waits_for_every_learning_matrix_to_stop_moving() -> None:
    crit = StopCriteria(stop_on="heavy_tailed", patience=2, alpha_tolerance=0.05, entropy_tolerance=0.01)
    ph = {"a": "heavy_tailed", "b": "bulk_decay"}
    seq = [_recs(a=(3.0, 0.90), b=(4.0, 0.95)),   # 1: both anchored
           _recs(a=(2.9, 0.90), b=(3.0, 0.95)),   # 2: b's alpha moved 25 % -> re-anchored
           _recs(a=(2.9, 0.895), b=(3.05, 0.95)),  # 3: a has held for 2 analyses, b for 1
           _recs(a=(2.9, 0.895), b=(3.05, 0.95))]  # 4: both held for >= 2 -> stop
    flags, state, decision = _run(crit, [(r, ph, e) for e, r in enumerate(seq)])
    assert flags == [False, False, False, True]
    assert decision.reason is StopReason.SETTLED and "all 2 learning weight matrices (1 heavy_tailed)" in decision.message
    assert state.anchors["a"].progress == 1.0 and state.anchors["b"] == Anchor(2.0, 1, 3.0, 0.95)
    # the entropy tolerance counts too: a 2 % entropy change re-anchors
    flags, _, _ = _run(crit, [(r, ph, e) for e, r in enumerate(seq[:3] + [_recs(a=(2.9, 0.88), b=(3.05, 0.95))])])
    assert flags == [False, False, False, False]


def test_settled_rule_ignores_random_like_and_unclassified_matrices_but_needs_the_stop_phase() -> None:
    crit = StopCriteria(stop_on="heavy_tailed", patience=1)
    moving = [_recs(a=(3.0, 0.9), r=(9.0 + e, 0.99 - e / 10), s=(1.0 + e, 0.5)) for e in range(3)]
    ph = {"a": "heavy_tailed", "r": "random_like", "s": None}  # r keeps moving (random-like), s is too small
    assert _run(crit, [(r, ph, e) for e, r in enumerate(moving)])[0] == [False, True, True]
    # no learning matrix in the stop phase: never stops, however settled
    assert _run(crit, [(r, {**ph, "a": "bulk_decay"}, e) for e, r in enumerate(moving)])[0] == [False] * 3
    # nothing classified at all
    assert _run(crit, [(r, {}, e) for e, r in enumerate(moving)])[0] == [False] * 3
    # min_epochs delays the stop
    late = StopCriteria(stop_on="heavy_tailed", patience=1, min_epochs=2)
    assert _run(late, [(r, ph, e) for e, r in enumerate(moving)])[0] == [False, False, True]


def test_stop_state_round_trips_through_a_weights_only_checkpoint(tmp_path) -> None:
    crit = StopCriteria(stop_on="heavy_tailed", patience=3)
    _, state, _ = _run(crit, [(_recs(a=(3.0, 0.9)), {"a": "heavy_tailed"}, e) for e in range(2)])
    torch.save({"s": state.state_dict()}, tmp_path / "s.pt")
    restored = StopState.from_state_dict(torch.load(tmp_path / "s.pt", weights_only=True)["s"])
    assert restored == state and StopState.from_state_dict({}) == StopState()


def test_replay_matches_the_rule_and_skips_the_baseline() -> None:
    def analysis(epoch, trigger="epoch_end"):
        return {"epoch": epoch, "step": 10 * (epoch + 1), "trigger": trigger,
                "records": [{"name": "a", "alpha": 3.0, "entropy": 0.9, "phase": "heavy_tailed"}]}

    runs = [analysis(0, "train_start")] + [analysis(e) for e in range(5)]
    stop = replay_stop(runs, patience=2)
    assert stop["epoch"] == 2 and stop["reason"] == "SETTLED"
    assert replay_stop(runs, patience=9) is None


def test_over_trained_needs_a_trusted_power_law() -> None:
    assert over_trained(RECORDS, PHASES) == ["a"]
    assert over_trained(RECORDS, {**PHASES, "a": "bulk_decay"}) == []  # alpha < 2 without a trusted tail
    crit = StopCriteria(stop_on_over_trained=True)
    flags, _, decision = _run(crit, [(RECORDS, PHASES, 0)])
    assert flags == [True] and decision.reason is StopReason.OVER_TRAINED and "a" in decision.message


def test_criteria_validation() -> None:
    assert not StopCriteria().active
    assert StopCriteria().settle_patience == 7 and StopCriteria().streak_patience == 1
    for bad in ({"stop_on": "banana"}, {"stop_on": "heavy_tailed", "stop_fraction": 0.0},
                {"stop_on": "heavy_tailed", "patience": 0}, {"rule": "vibes"}, {"alpha_tolerance": -1}):
        with pytest.raises(ValueError):
            StopCriteria(**bad)


# ---------------------------------------------------------------------------------------------- scalars


def test_scalar_keys_and_values() -> None:
    records = [
        {"name": "l1", "status": "success", "alpha": 2.5, "entropy": 0.8, "stable_rank": 10.0, "num_spikes": 3,
         "alpha_weighted": 1.0, "mp_softrank": 0.4, "phase": "heavy_tailed", "log_spectral_norm": 0.0},
        {"name": "l2", "status": "success", "alpha": 7.5, "entropy": 0.95, "stable_rank": 50.0, "num_spikes": 0,
         "alpha_weighted": 2.0, "mp_softrank": 1.0, "phase": None, "log_spectral_norm": 0.2},
        {"name": "l3", "status": "skipped", "alpha": math.nan, "entropy": math.nan, "phase": None},
    ]
    m = scalar_metrics(records, {"l1": "heavy_tailed", "l2": None, "l3": None}, prefix="p")
    assert m["p/l1/alpha"] == 2.5 and m["p/l1/num_spikes"] == 3.0
    assert m["p/l1/phase"] == Phase.HEAVY_TAILED.code and m["p/l2/phase"] == -1.0
    assert "p/l3/alpha" not in m and "p/l3/phase" not in m  # skipped: nothing logged, NaN never logged
    # model-level means over classified matrices only: l2 (no phase: too few eigenvalues) is not averaged
    assert m["p/alpha_mean"] == pytest.approx(2.5) and m["p/entropy_mean"] == pytest.approx(0.8)
    assert m["p/frac_heavy_tailed"] == 1.0 and m["p/num_valid"] == 1.0
    assert all(math.isfinite(v) for v in m.values())


def test_phase_legend_and_dashboard() -> None:
    legend = phase_legend()
    for phase in Phase:
        assert f"| {phase.code} | {phase.value} |" in legend
    layout = dashboard_layout("htsr")
    tags = [t for charts in layout.values() for _, (kind, regexes) in charts.items() for t in regexes]
    import re

    assert any(re.match(t, "htsr/blocks.0.attn.in_proj.q/alpha") for t in tags)
    assert any(re.match(t, "htsr/alpha_mean") for t in tags)
    assert "| fc |" in results_table([{"name": "fc", "alpha": 2.0}], {"fc": "heavy_tailed"})


def test_tensorboard_writer_detection_by_capability() -> None:
    class Plain:
        experiment = object()

    class Board:
        class experiment:  # noqa: N801 - mimics a SummaryWriter
            add_histogram = add_figure = add_text = add_custom_scalars = add_scalar = staticmethod(lambda *a: None)

    class Broken:
        @property
        def experiment(self):
            raise RuntimeError("offline")

    assert tensorboard_writer(Plain()) is None
    assert tensorboard_writer(Board()) is Board.experiment
    assert tensorboard_writer(Broken()) is None


# ------------------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_history_appends_and_round_trips(tmp_path, suffix: str) -> None:
    path = tmp_path / f"h{suffix}"
    writer = HistoryWriter(path)
    writer.append([{"analysis": 0, "name": "a", "alpha": 2.5, "phase": "heavy_tailed", "unknown": 1}])
    writer.append([{"analysis": 1, "name": "a", "alpha": math.nan, "phase": None, "stopping_reason": "why"}])
    frame = read_history(path)
    assert list(frame.columns) == list(HISTORY_COLUMNS)
    assert frame["analysis"].tolist() == [0, 1]
    assert frame["alpha"].iloc[0] == 2.5 and math.isnan(frame["alpha"].iloc[1])
    assert frame["stopping_reason"].iloc[1] == "why"


def test_spectra_file_round_trips(tmp_path) -> None:
    path = tmp_path / "s.npz"
    write_spectra(path, {"blocks.0.attn.in_proj.q": np.array([1.0, 2.0]), "skipped": None}, step=16, epoch=1)
    write_spectra(path, {"fc": np.array([3.0])}, step=24, epoch=2)  # replaced, not appended
    spectra, step, epoch = read_spectra(path)
    assert (step, epoch) == (24, 2) and list(spectra) == ["fc"]
    assert not list(tmp_path.glob("*.tmp*"))


# ---------------------------------------------------------------------------------------- work sharing


def test_owners_balance_cost_and_keep_split_matrices_together() -> None:
    model = nn.Sequential(nn.Linear(512, 2048), nn.MultiheadAttention(256, 4), nn.Linear(64, 64),
                          nn.LSTM(128, 128), nn.Linear(2048, 512))
    plan = weight_matrices(model, materialize=False)
    owners = assign_owners(plan, 2)
    assert set(owners) == {m.source for m in plan}
    load = [0.0, 0.0]
    for m in plan:
        load[owners[m.source]] += matrix_cost(m)
    assert max(load) / sum(load) < 0.6
    # q, k, v of one attention module go to one rank; so do the gates of one recurrent weight
    assert len({owners[m.source] for m in plan if m.name.startswith("1.in_proj")}) == 1
    assert assign_owners(plan, 1) == {s: 0 for s in owners}


def test_plan_does_not_read_weights() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 128), nn.Conv2d(3, 8, 3))
    plan = weight_matrices(model, materialize=False)
    assert [(m.N, m.M, m.num_slices) for m in plan] == [(128, 64, 1), (8, 3, 9)]
    assert all(m.slices is None for m in plan)


# ------------------------------------------------------------------------------------- figure rendering


def _phase_map_job(step: int) -> "FigureJob":
    from lightning_htsr.training.sinks.figures import FigureJob

    return FigureJob("htsr/phase_map", step, "phase_map", {
        "names": ["a", "b"], "steps": [0, step], "phases": [["random_like", "heavy_tailed"], [None, "bulk_decay"]],
        "title": "t"}, 1.0)


def test_render_png_has_the_pixels_of_add_figure() -> None:
    import io

    from PIL import Image
    from torch.utils.tensorboard._utils import figure_to_image

    from lightning_htsr.training.sinks.figures import draw, render_png

    job = _phase_map_job(8)
    png, height, width = render_png(job)
    ours = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    theirs = np.moveaxis(figure_to_image(draw(job), close=False), 0, 2)  # what SummaryWriter.add_figure writes
    assert ours.shape == (height, width, 3)
    np.testing.assert_array_equal(ours, theirs)


def test_renderer_draws_in_process_what_a_dead_child_left(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from lightning_htsr.training.sinks.figures import FigureRenderer

    writer = SummaryWriter(str(tmp_path))
    renderer = FigureRenderer()
    renderer.submit(writer, _phase_map_job(1))
    assert renderer._process is not None
    renderer._process.kill()  # the child dies with jobs queued or in flight
    for step in (2, 3):
        renderer.submit(writer, _phase_map_job(step))
    renderer.close()
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    assert sorted(e.step for e in acc.Images("htsr/phase_map")) == [1, 2, 3]


def test_renderers_of_one_process_share_one_child_that_outlives_a_fit(tmp_path) -> None:
    """Two renderers (two fits, two callbacks) and two closes: one child started once, every figure in its own
    writer; a dead child is replaced for the next renderer."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from lightning_htsr.training.sinks.figures import FigureRenderer

    first, second = FigureRenderer(), FigureRenderer()
    for name, renderer, steps in (("a", first, (1, 2)), ("b", second, (3,)), ("a2", first, (4,))):
        writer = SummaryWriter(str(tmp_path / name))
        for step in steps:
            renderer.submit(writer, _phase_map_job(step))
        renderer.close()
        writer.close()
        acc = EventAccumulator(str(tmp_path / name), size_guidance={"images": 0})
        acc.Reload()
        assert sorted(e.step for e in acc.Images("htsr/phase_map")) == list(steps)
    assert first._process is second._process and first._process.poll() is None
    first._process.kill()
    first._process.wait()
    third = FigureRenderer()
    third.submit(SummaryWriter(str(tmp_path / "c")), _phase_map_job(5))
    assert third._process is not None and third._process is not first._process
    third.close()


def test_renderer_waits_instead_of_queueing_without_bound(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from lightning_htsr.training.sinks.figures import FigureRenderer

    writer = SummaryWriter(str(tmp_path))
    renderer = FigureRenderer(max_pending=1)
    for step in (1, 2, 3):
        renderer.submit(writer, _phase_map_job(step))
        assert len(renderer._pending) <= 1
    renderer.close()
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("htsr/phase_map")] == [1, 2, 3]


def test_renderer_pickles_its_settings_only() -> None:
    import pickle

    from lightning_htsr.training.sinks.figures import FigureRenderer

    copy = pickle.loads(pickle.dumps(FigureRenderer(background=False, max_pending=3)))
    assert (copy.background, copy.max_pending, copy._pending) == (False, 3, {})


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_split_after_moves_whole_records_even_with_a_multi_line_field(tmp_path, suffix) -> None:
    """The rows a resumed run writes again are moved aside as records: a skip reason spanning lines (an exception
    text) stays whole on its side, and both files read back."""
    from lightning_htsr.training.sinks.history import HistoryWriter, split_after

    path = tmp_path / f"h{suffix}"
    writer = HistoryWriter(path)
    for analysis in range(4):
        writer.append([{"analysis": analysis, "name": "fc", "alpha": 3.0 + analysis,
                        "skip_reason": "first\nsecond\nthird" if analysis in (1, 3) else ""}])
    count, moved = split_after(path, 2)
    assert count == 2 and moved == tmp_path / f"h.superseded1{suffix}"
    kept, gone = read_history(path), read_history(moved)
    assert kept["analysis"].tolist() == [0, 1] and gone["analysis"].tolist() == [2, 3]
    assert kept["skip_reason"].tolist()[1] == gone["skip_reason"].tolist()[1] == "first\nsecond\nthird"
    assert split_after(path, 2) == (0, None)
