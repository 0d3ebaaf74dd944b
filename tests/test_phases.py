"""5+1 phase classifier: accuracy on synthetic phases, fresh initializations, config, hysteresis."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import lightning_htsr as htsr
from lightning_htsr.analysis import analyze_matrices
from lightning_htsr.spectra import synthetic
from lightning_htsr.spectra.eigenvalues import eigenvalues
from lightning_htsr.spectra.phases import Phase, PhaseConfig, PhaseTracker, classify_phase
from lightning_htsr.weights.matrix import WeightMatrix

# Q from 1 to 10, M from 256 to 1024. Seeds 500+ were never used while calibrating (scripts/calibrate_phases.py
# calibrates on seeds 0-4 and was checked on 1000+ and 2000+).
SHAPES = [(256, 256), (2560, 256), (512, 512), (1536, 512), (1024, 1024), (4096, 1024)]
SEEDS = [500, 501, 502]
CLEAR = {Phase.RANDOM_LIKE, Phase.BULK_PLUS_SPIKES, Phase.HEAVY_TAILED, Phase.RANK_COLLAPSE}


@pytest.fixture(scope="module")
def confusion() -> dict[Phase, collections.Counter]:
    torch.set_num_threads(1)
    table: dict[Phase, collections.Counter] = {}
    for phase in Phase:
        mats = [
            WeightMatrix.from_tensor(f"{phase.value}-{N}x{M}-{seed}", synthetic.phase_example(phase, N, M, seed=seed))
            for N, M in SHAPES
            for seed in SEEDS
        ]
        table[phase] = collections.Counter(r.record["phase"] for r in analyze_matrices(mats))
    return table


def test_overall_accuracy_at_least_95_percent(confusion: dict[Phase, collections.Counter]) -> None:
    total = sum(sum(c.values()) for c in confusion.values())
    correct = sum(c[p.value] for p, c in confusion.items())
    assert total == len(Phase) * len(SHAPES) * len(SEEDS)
    assert correct / total >= 0.95, {p.value: dict(c) for p, c in confusion.items()}


@pytest.mark.parametrize("phase", sorted(CLEAR, key=lambda p: p.code), ids=lambda p: p.value)
def test_clear_phases_are_always_right(confusion: dict[Phase, collections.Counter], phase: Phase) -> None:
    counts = confusion[phase]
    assert counts[phase.value] == sum(counts.values()), dict(counts)


@pytest.mark.parametrize("phase", [Phase.BLEEDING_OUT, Phase.BULK_DECAY], ids=lambda p: p.value)
def test_fuzzy_phases_are_mostly_right(confusion: dict[Phase, collections.Counter], phase: Phase) -> None:
    counts = confusion[phase]
    assert counts[phase.value] / sum(counts.values()) >= 0.85, dict(counts)


INITS = {
    "default": lambda w: None,
    "kaiming_normal": nn.init.kaiming_normal_,
    "kaiming_uniform": nn.init.kaiming_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "xavier_uniform": nn.init.xavier_uniform_,
    "orthogonal_free_normal": lambda w: nn.init.normal_(w, std=0.02),
    "orthogonal": nn.init.orthogonal_,  # every singular value 1: a bulk narrower than MP, nothing above the edge
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("init", list(INITS))
def test_freshly_initialized_model_is_random_like(init: str, seed: int) -> None:
    torch.manual_seed(1000 * list(INITS).index(init) + seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3),  # 3 columns per slice: 27 eigenvalues -> too few to classify
        nn.Conv2d(16, 64, 3),
        nn.Conv2d(64, 64, 5),
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.Linear(512, 512),
        nn.Linear(512, 10),  # 10 eigenvalues -> too few to classify
        nn.Embedding(1000, 128),
    )
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            INITS[init](module.weight)
    df = htsr.analyze(model)
    classified = df[df.phase.notna()]
    assert set(classified.name) == {"1", "2", "4", "5", "7"}
    assert (classified.phase == "random_like").all(), classified[["name", "phase", "phase_reason"]]
    small = df[df.phase.isna()]
    assert set(small.name) == {"0", "6"}
    assert small.phase_reason.str.contains("needed to classify").all()


@pytest.mark.parametrize("shape", [(512, 512), (1024, 256), (256, 1024)])
def test_orthogonal_and_semi_orthogonal_inits_are_random_like(shape: tuple[int, int]) -> None:
    # All singular values equal: no eigenvalue above the Tracy-Widom edge, so not bulk_decay (which needs eigenmass
    # above the edge), although the delta-like bulk does not match Marchenko-Pastur's shape.
    layer = nn.Linear(shape[1], shape[0], bias=False)
    nn.init.orthogonal_(layer.weight, generator=torch.Generator().manual_seed(0))
    row = htsr.analyze(layer).iloc[0]
    assert row.phase == "random_like", row.phase_reason
    assert row.num_spikes == 0 and row.ks_mp > 0.4  # not MP-shaped: it is the rule for "nothing above the edge"


def test_rank_collapse_at_every_aspect_ratio_including_square() -> None:
    for N, M in [(300, 300), (600, 300), (3000, 300)]:
        w = synthetic.low_rank(N, M, rank=100, seed=0)
        res = classify_phase(eigenvalues(w, precision="float64"), N, M)
        assert res.phase is Phase.RANK_COLLAPSE, (N, M, res.reason)
        assert res.frac_zero == pytest.approx(200 / 300, abs=0.01)


def test_very_heavy_tail_beyond_double_precision_is_not_rank_collapse() -> None:
    """Pareto(mu=0.5) spans more decades than float64 resolves; the unresolved part is not a zero cluster."""
    layer = nn.Linear(500, 1000, bias=False)
    with torch.no_grad():
        layer.weight.copy_(synthetic.pareto(1000, 500, 0.5, seed=0))
    row = htsr.analyze(layer).iloc[0]
    assert row.phase == "heavy_tailed"
    assert row.frac_zero == 0.0


def test_diagnostics_explain_the_label() -> None:
    w = synthetic.spiked(1000, 500, [4.0, 5.0], seed=3)
    res = classify_phase(eigenvalues(w), 1000, 500)
    assert res.phase is Phase.BULK_PLUS_SPIKES
    d = res.diagnostics()
    assert d["phase"] == "bulk_plus_spikes" and d["num_spikes"] == 2
    assert d["spike_gap_tw"] >= PhaseConfig().spike_separation
    assert d["ks_mp"] <= PhaseConfig().max_ks_mp
    assert "2 spike(s)" in d["phase_reason"]
    for key in ("lambda_plus", "tw_scale", "spike_threshold", "tail_mass", "mp_softrank", "frac_zero",
                "lr_exponential"):
        assert key in d


def test_thresholds_can_be_overridden() -> None:
    w = synthetic.correlated_heavy_tailed(1000, 500, 2.5, seed=0)
    ev = eigenvalues(w)
    assert classify_phase(ev, 1000, 500).phase is Phase.HEAVY_TAILED
    strict = PhaseConfig(max_alpha=2.0)
    assert classify_phase(ev, 1000, 500, config=strict).phase is Phase.BULK_DECAY
    none = classify_phase(ev, 1000, 500, config=PhaseConfig(min_evals=10_000))
    assert none.phase is None and "needed to classify" in none.reason


def test_over_trained_alpha_below_2_is_still_heavy_tailed() -> None:
    w = synthetic.pareto(1000, 500, 1.0, seed=0)
    res = classify_phase(eigenvalues(w), 1000, 500)
    assert res.phase is Phase.HEAVY_TAILED and res.powerlaw.alpha < 2


def test_empty_and_zero_spectra_are_unclassified() -> None:
    assert classify_phase(torch.zeros(100), 200, 100).phase is None
    assert classify_phase(torch.zeros(0), 200, 100).phase is None


def test_phase_codes_round_trip() -> None:
    assert [p.code for p in Phase] == [0, 1, 2, 3, 4, 5]
    assert all(Phase.from_code(p.code) is p for p in Phase)
    assert Phase("heavy_tailed") is Phase.HEAVY_TAILED and str(Phase.HEAVY_TAILED) == "heavy_tailed"


# ------------------------------------------------------------------------------------ tracker


def test_tracker_switches_only_after_k_consecutive_agreeing_analyses() -> None:
    tracker = PhaseTracker(k=3)
    seq = ["random_like", "heavy_tailed", "heavy_tailed", "random_like", "heavy_tailed", "heavy_tailed",
           "heavy_tailed", "heavy_tailed"]
    out = [tracker.update({"fc": p})["fc"] for p in seq]
    assert out == ["random_like"] * 6 + ["heavy_tailed"] * 2


def test_tracker_k1_follows_raw_labels_and_ignores_unclassified() -> None:
    tracker = PhaseTracker(k=1)
    assert tracker.update({"a": "random_like", "b": None}) == {"a": "random_like"}
    assert tracker.update({"a": Phase.BULK_DECAY, "b": "heavy_tailed"}) == {"a": "bulk_decay", "b": "heavy_tailed"}
    tracker = PhaseTracker(k=2)
    tracker.update({"a": "random_like"})
    tracker.update({"a": "heavy_tailed"})
    tracker.update({"a": None})  # neither counts nor breaks the streak
    assert tracker.update({"a": "heavy_tailed"})["a"] == "heavy_tailed"


def test_tracker_changing_candidate_restarts_the_streak() -> None:
    tracker = PhaseTracker(k=2)
    tracker.update({"a": "random_like"})
    tracker.update({"a": "bleeding_out"})
    assert tracker.update({"a": "bulk_decay"})["a"] == "random_like"
    assert tracker.update({"a": "bulk_decay"})["a"] == "bulk_decay"


def test_tracker_state_round_trips_through_a_weights_only_checkpoint(tmp_path) -> None:
    tracker = PhaseTracker(k=3)
    for p in ["random_like", "heavy_tailed", "heavy_tailed"]:
        tracker.update({"fc": p, "head": "bulk_decay"})
    path = tmp_path / "state.pt"
    torch.save(tracker.state_dict(), path)
    restored = PhaseTracker()
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored == tracker
    assert restored.update({"fc": "heavy_tailed"})["fc"] == tracker.update({"fc": "heavy_tailed"})["fc"]


def test_tracker_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="k must be"):
        PhaseTracker(k=0)


def test_unknown_phase_name_is_rejected() -> None:
    with pytest.raises(ValueError):
        PhaseTracker().update({"a": "banana"})
