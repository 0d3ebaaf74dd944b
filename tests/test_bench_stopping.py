"""The stopping benchmark's quick mode, so the script cannot rot: real Trainer runs of its tasks (tiny budgets), the
default rule and a rule that does stop, and the check that the live stop (and the accuracy of the model left in
memory) equals the rule replayed on the reference run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("sklearn")
    pytest.importorskip("mnist1d")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_stopping
    finally:
        sys.path.remove(str(BENCHMARKS))
    return bench_stopping


def test_quick_run_stops_live_where_the_replay_says_and_writes_json(bench, tmp_path, capsys) -> None:
    # stop as soon as half the classified matrices are random-like: every run stops after its first epoch
    rule = {"rule": "phase_fraction", "stop_on": "random_like", "stop_fraction": 0.5}
    out = tmp_path / "bench.json"
    code = bench.main(["--quick", "--seeds", "0", "--tasks", "mlp_digits", "cnn2d_digits", "gru_seq",
                       "--rule", json.dumps(rule), "--json", str(out), "--figure", str(tmp_path / "fig.png")])
    assert code == 0  # 0: no run stopped live anywhere else than the replay of its reference run
    result = json.loads(out.read_text())
    assert result["mismatches"] == []
    rule_rows = [r for r in result["rows"] if r["method"] == "htsr stop rule"]
    assert len(rule_rows) == 3 and all(r["stopped"] and r["epochs_run"] == 1 for r in rule_rows)
    assert all(r["extra"]["replay_stop_epoch"] == 0 for r in rule_rows)
    summary = result["summary"]["htsr stop rule"]
    assert summary["runs"] == 3 and summary["never_stopped"] == 0 and summary["epochs_saved"] == pytest.approx(0.5)
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "EarlyStopping(val_loss, 5)" in printed and "within 1pt" in printed


def test_quick_run_of_the_default_rule_matches_its_replay_on_a_plateau_and_an_over_fitting_task(bench, tmp_path) -> None:
    out = tmp_path / "bench.json"
    code = bench.main(["--quick", "--seeds", "0", "--tasks", "mlp_digits", "gru_lm", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["rule"] == {} and result["mismatches"] == []
    rows = {(r["task"], r["method"]): r for r in result["rows"]}
    for task in ("mlp_digits", "gru_lm"):
        live = rows[(task, "htsr stop rule")]
        assert live["epochs_run"] == 2 and not live["stopped"]  # 2 epochs: too short for the default rule
        assert live["test_acc"] == rows[(task, "reference (full budget)")]["test_acc"]  # same weights as the replay
        assert rows[(task, "EarlyStopping(val_loss, 5)")]["epochs_run"] == 2
        assert rows[(task, "EarlyStopping(val_acc, 5)")]["epochs_run"] == 2


def test_a_monitored_validation_accuracy_is_recorded_and_replayed_like_the_live_run(bench) -> None:
    """The reference curve records ``val_acc`` (a percentage, logged by the benchmark's module) and the rule
    ``monitor="val_acc"`` (mode max) replayed on it stops where the live run stops."""
    rule = {"monitor": "val_acc", "monitor_mode": "max", "monitor_patience": 1}
    result = bench.run_task_seed("mlp_digits", 0, rule, "all", None, True)
    curve = result["reference"]["curve"]
    assert len(curve) == 2 and all(0.0 <= c["val_acc"] <= 100.0 and c["val_loss"] > 0 for c in curve)
    replayed, live = bench.replay(result["reference"], rule), result["rule"]
    assert live["epochs_run"] == (replayed["stop_epoch"] + 1 if replayed["stopped"] else 2)
    assert live["test_acc"] == pytest.approx(replayed["test_acc"])
    for name, (_, (monitor, mode)) in bench.PEERS.items():  # the live peers equal their replays too
        peer = bench.early_stopping_replay(result["reference"], 5, 0.0, monitor, mode)
        assert result["peers"][name]["epochs_run"] == peer["epochs_run"] == 2


def test_every_task_builds_and_trains_one_step(bench) -> None:
    import torch

    for task in bench.TASKS.values():
        (x, y), _, (xt, yt) = bench.splits(task, 0, quick=True)
        model = task.model(0)
        logits = model(x[:8])  # classes on dim 1: (8, 10), or (8, vocab, length) for the language model
        assert logits.shape[:2] == (8, 16 if task.name == "gru_lm" else 10) and logits.shape[2:] == y.shape[1:]
        assert int(y.max()) < logits.shape[1] and len(xt) == len(yt) > 0
        optimizer, _ = task.optimizer(model.parameters(), task.epochs)
        torch.nn.functional.cross_entropy(logits, y[:8]).backward()
        optimizer.step()


def test_the_weight_study_records_traps_and_deltas_from_real_runs(bench, capsys) -> None:
    """``stopping_weight_study.py --quick``: real Trainer runs analyzed at every epoch end with the trap columns and
    the ESD of ``W - W0``; the signals' table names every candidate."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import stopping_weight_study as study
    finally:
        sys.path.remove(str(BENCHMARKS))
    runs = study.main(["--quick", "--seeds", "0", "--tasks", "mlp_digits", "gru_lm"])
    assert [r["task"] for r in runs] == ["mlp_digits", "gru_lm"]
    for run in runs:
        start, *ends = run["analyses"]
        assert start["trigger"] == "train_start" and len(ends) == 2 and len(run["curve"]) == 2
        assert all("delta_entropy" not in r for r in start["records"])  # W - W0 is zero before training
        hidden = [r for a in ends for r in a["records"] if r["name"] in ("net.2", "net.gru.weight_hh_l0.r")]
        assert hidden and all(0 < r["delta_entropy"] <= 1 and r["delta_stable_rank"] >= 1 for r in hidden)
        assert all(r["num_traps"] >= 0 and 0 <= r["rand_distance"] and r["neg_rand_distance"] == -r["rand_distance"]
                   for a in run["analyses"] for r in a["records"] if r.get("rand_distance") is not None)
    printed = capsys.readouterr().out
    assert all(name in printed for name in study.SIGNALS)


def test_the_held_out_tasks_run_live_and_match_their_replay(bench) -> None:
    """``stopping_heldout.py --quick``: the tasks added after the rule was frozen train like the benchmark's, and the
    live stop equals the rule replayed on the reference run."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import stopping_heldout as heldout
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = heldout.main(["--quick", "--seeds", "0", "--tasks", "cnn2d_digits_noisy", "cnn1d_mnist1d_small",
                        "mlp_teacher_sampled", "cnn1d_mnist1d_pairflip", "lstm_lm"])
    assert out["mismatches"] == [] and out["rule"] == {}
    assert out["summary"]["held-out over-fitting tasks / htsr stop rule"]["runs"] == 4
    assert out["summary"]["held-out plateau task / EarlyStopping(val_loss, 5)"]["runs"] == 1


def test_twin_tasks_share_the_training_trajectory_and_relabel_only_held_out_data(bench) -> None:
    """``stopping_twins.py --quick``: a twin keeps the training split (so the HT-SR history is identical, record for
    record) and labels held-out data by the nearest training example (a training input gets its own label)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import stopping_twins as twins
    finally:
        sys.path.remove(str(BENCHMARKS))
    for name in twins.TWINNED:
        original, twin = bench.TASKS[name].data(0), twins.TWINS[f"{name}_twin"].data(0)
        assert all(a.equal(b) for a, b in zip(original[0], twin[0]))  # the training split, noisy labels included
        assert twins.nearest_labels(original[0], original[0][0][:50]).equal(original[0][1][:50])
        assert not twin[2][1].equal(original[2][1]) and twin[2][0].equal(original[2][0])
    out = twins.main(["--quick", "--seeds", "0", "--tasks", "mlp_digits_noisy", "transformer_noisy"])
    assert out["pairs"] == 2 and out["same_trajectory"] == 2
    assert set(out["rules"]) == set(twins.RULES) and all(0 <= r["both"] <= 1 for r in out["rules"].values())


def test_the_gradient_study_records_training_signals_from_real_runs(bench, capsys) -> None:
    """``stopping_gradient_study.py --quick``: real Trainer runs record, per epoch, the training loss, the gradient's
    signal-to-noise and the weights' path coherence; the displacement of an epoch can never exceed the length of the
    path the weights took (the triangle inequality), and the rules fire where their series says."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import stopping_gradient_study as study
        from stopping_runs import steps_per_epoch
    finally:
        sys.path.remove(str(BENCHMARKS))
    runs = study.main(["--quick", "--seeds", "0", "--tasks", "mlp_digits", "gru_lm", "cnn2d_digits_noisy"])
    assert [r["task"] for r in runs] == ["mlp_digits", "gru_lm", "cnn2d_digits_noisy"]
    for run in runs:
        assert [e["epoch"] for e in run["signals"]] == [0, 1] and len(run["curve"]) == 2
        for e in run["signals"]:
            assert e["steps"] == steps_per_epoch(bench.TASKS[run["task"]], 0, quick=True)
            assert 0 < e["coherence"] <= 1 + 1e-9 and 0 < e["coherence_matrices"] <= 1 + 1e-9
            assert e["gsnr"] > 0 and e["snr_elements"] > 0 and e["train_loss"] > 0
            assert -1 - 1e-9 <= e["agreement"] <= 1 + 1e-9  # |<g_t, g_t-1>| <= (|g_t|^2 + |g_t-1|^2) / 2
            assert -1 - 1e-9 <= e["agreement_matrices"] <= 1 + 1e-9
            assert e["update_stable_rank"] >= 1 - 1e-9 and 0 <= e["update_spike_share"] <= 1 + 1e-9
            assert -1 - 1e-9 <= e["update_alignment"] <= 1 + 1e-9
    assert runs[0]["signals"][1]["train_loss"] < runs[0]["signals"][0]["train_loss"]  # the weights really moved
    series = [{"epoch": i, "x": v} for i, v in enumerate([1.0, 4.0, 3.0, 1.5, 1.0, 0.9, 5.0])]
    assert study.falls("x", 0.5, patience=1)(series) == 3  # 1.5 < 0.5 * 4
    assert study.falls("x", 0.5, patience=2)(series) == 4
    assert study.falls("x", 0.1)(series) is None
    assert study.below("x", 1.2, patience=2)(series) == 5 and study.below("x", 0.5)(series) is None
    assert study.above("x", 3.5)(series) == 1 and study.above("x", 3.5, patience=2)(series) is None
    assert study.rises("x", 2.0)(series) == 1 and study.rises("x", 5.0)(series) == 6  # 5.0 > 5 * 0.9
    # the update's shape: a step along W's top singular pair is rank 1 and all inside; growing W is aligned with it
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    rank, inside, cosine = study.update_shape(w, w + 0.1 * torch.outer(u[:, 0], vh[0]))
    assert rank == pytest.approx(1) and inside == pytest.approx(1) and cosine > 0
    rank, inside, cosine = study.update_shape(w, 1.1 * w)
    assert cosine == pytest.approx(1) and inside < 0.5 and rank > 1
    rank, inside, _ = study.update_shape(w, w + 0.1 * torch.outer(u[:, -1], vh[-1]))  # the weakest pair: outside
    assert rank == pytest.approx(1) and inside == pytest.approx(0, abs=1e-12)
    assert study.update_shape(w, w) is None and study.update_shape(w[:4], w[:4] + 1) is None
    # scored like the benchmark: the accuracy at the end of the epoch it fires, epochs saved after that epoch
    run = {"epochs": 7, "signals": series, "curve": [{"test_acc": a} for a in (50, 70, 80, 78, 75, 74, 72)]}
    assert study.score(run, study.falls("x", 0.5)) == (80 - 78, 1 - 4 / 7, True)
    assert study.score(run, study.falls("x", 0.1)) == (80 - 72, 0.0, False)  # never fired: the last epoch's model
    printed = capsys.readouterr().out
    assert all(name in printed for name in study.RULES)


def test_the_held_out_over_fitting_data_are_what_their_docs_say(bench) -> None:
    """Class-dependent noise moves a label to the next class only (about 35 % of them) and the test stays clean; the
    sampled teacher's splits have the documented sizes; the LM's target is its input shifted by one."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import stopping_heldout as heldout
        from stopping_tasks import mnist1d
    finally:
        sys.path.remove(str(BENCHMARKS))
    (x, y), (_, yv), (_, ys) = heldout.mnist1d_pairflip(0)
    (cx, cy), (_, cyv), (_, cys) = mnist1d(0)
    assert torch.equal(x.squeeze(1), cx) and torch.equal(ys, cys)
    shift = (y - cy) % 10
    assert set(shift.tolist()) == {0, 1} and 0.3 < shift.float().mean() < 0.4
    assert set(((yv - cyv) % 10).tolist()) == {0, 1}
    (xt, _), _, (_, likeliest) = heldout.teacher_sampled(0)
    assert xt.shape == (1000, 24) and len(likeliest) == 1200 and len(set(likeliest.tolist())) == 10
    (tokens, targets), _, _ = heldout.markov_text_order1(0)
    assert torch.equal(tokens[:, 1:], targets[:, :-1]) and int(tokens.max()) < 24


def test_the_prediction_study_counts_changed_training_predictions_without_touching_the_run(bench, capsys) -> None:
    """``stopping_prediction_study.py --quick``: real Trainer runs (a classifier, a language model read per token, a
    2-D CNN) record, per epoch, the share of training predictions that changed, which way, and the fit to the training
    labels; reading them does not change the run (the test-accuracy curve is that of a run without the observer);
    Label Wave's rule keeps the epoch of fewest changes and stops ``patience`` epochs after it."""
    import lightning.pytorch as pl

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import stopping_prediction_study as study
    finally:
        sys.path.remove(str(BENCHMARKS))
    tasks = ["mlp_digits", "gru_lm", "cnn2d_digits_noisy"]
    runs = study.main(["--quick", "--seeds", "0", "--tasks", *tasks])
    assert [r["task"] for r in runs] == tasks
    for run in runs:
        first, second = run["signals"]
        assert [first["epoch"], second["epoch"]] == [0, 1]
        assert all(math.isnan(first[c]) for c in ("wave", "flips", "flips_to_label", "flips_from_label"))
        assert 0 < second["wave"] <= 1 and 0 <= second["flips"] <= 1  # the weights moved, so predictions did
        # a changed prediction moves onto its label or off it (never both: it differs from the one before)
        assert second["flips_to_label"] + second["flips_from_label"] <= second["flips"] + 1e-12
        assert all(0 <= e["train_fit"] <= 1 for e in run["signals"])
        bare = bench.observed_run(run["task"], 0, pl.Callback(), quick=True)
        assert [c["test_acc"] for c in bare["curve"]] == [c["test_acc"] for c in run["curve"]]
    # the rule: the lowest (smoothed) value from epoch 2 on is kept; it stops once `patience` epochs had none lower
    series = [{"epoch": i, "x": v} for i, v in enumerate([0.9, 0.5, 0.3, 0.2, 0.25, 0.3, 0.1, 0.4, 0.5, 0.6])]
    assert study.fewest("x", patience=2)(series) == (5, 3)  # 0.2 at 3, then 0.25 and 0.3
    assert study.fewest("x", patience=3)(series) == (9, 6)  # 0.1 at 6 comes in time
    assert study.fewest("x", patience=5)(series) == (-1, 6)  # never stops; would restore epoch 6 at the end
    assert study.fewest("x", patience=2, window=3)(series) == (8, 6)  # means of 3: .57 .33 .25 .25 .22 .27 .33
    run = {"epochs": 10, "signals": series, "curve": [{"test_acc": a} for a in range(50, 60)]}
    assert study.score(run, study.fewest("x", 2), restore_at_end=False) == (9 - 3, 1 - 6 / 10, True)
    assert study.score(run, study.fewest("x", 5), restore_at_end=False) == (0, 0.0, False)  # the last epoch's model
    assert study.score(run, study.fewest("x", 5), restore_at_end=True) == (9 - 6, 0.0, False)
    # beside the default rule (replayed on a reference run of the same trajectory): the first to stop decides
    from stopping_runs import QUICK_EPOCHS, reference_run

    reference = reference_run(bench.TASKS["mlp_digits"], 0, QUICK_EPOCHS, quick=True)
    accs = [c["test_acc"] for c in runs[0]["curve"]]
    assert [c["test_acc"] for c in reference["curve"]] == accs
    default = bench.replay(reference, {"stop_on": "heavy_tailed"})
    alone, first = study.combined(runs[0], reference, lambda series: (0, 0))  # a rule that stops after epoch 0
    assert alone == pytest.approx(max(accs) - default["test_acc"])
    assert first == pytest.approx(max(accs) - (accs[0] if not default["stopped"] or default["stop_epoch"] > 0
                                               else default["test_acc"]))
    assert study.combined(runs[0], reference, lambda series: None) == (alone, alone)  # a rule that never stops
    printed = capsys.readouterr().out
    assert all(name in printed for name in study.RULES)
