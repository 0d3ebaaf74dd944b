"""Stage 1 (``layers.weight_matrices``) and its use by ``analyze``: which matrices, named how, shaped how, and with
the right eigenvalues.

Every expected spectrum is computed independently here: the slices a layer *should* produce are cut out of its
weight with NumPy (explicit loops over groups, kernel positions, q/k/v blocks and gates), and their squared singular
values (``numpy.linalg.svd``) are pooled and sorted. These are compared with the package's eigenvalues of the
stack it extracted, and with the ``norm`` / ``spectral_norm`` columns of ``analyze`` (``sum`` and ``max`` of the
eigenvalues of ``W^T W / N``).
"""

from __future__ import annotations

import itertools
import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lightning_htsr
from lightning_htsr import functional as F
from lightning_htsr.weights.matrix import LAYER_TYPES, WeightMatrix, layer_type_of
from lightning_htsr.weights.modules import weight_matrices
from lightning_htsr.weights.state_dict import state_dict_matrices

# --------------------------------------------------------------------------------------------------------------------
# helpers


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def npw(t: torch.Tensor) -> np.ndarray:
    """A parameter as a float64 NumPy array."""
    return t.detach().to(torch.float64).cpu().numpy()


def pooled_evals(slices: list[np.ndarray]) -> np.ndarray:
    """Sorted pooled squared singular values of the given slices (any orientation)."""
    return np.sort(np.concatenate([np.linalg.svd(s, compute_uv=False) ** 2 for s in slices]))


def conv_slices(weight: torch.Tensor, groups: int, transposed: bool = False) -> list[np.ndarray]:
    """One matrix per group and kernel position, cut out with explicit loops.

    Conv weight: ``(out, in/g, *k)``; group ``g`` owns output channels ``g*out/g : (g+1)*out/g``.
    ConvTranspose weight: ``(in, out/g, *k)``; group ``g`` owns input channels ``g*in/g : (g+1)*in/g``.
    Either way the first axis is the grouped one.
    """
    w = npw(weight)
    per_group = w.shape[0] // groups
    out = []
    for g in range(groups):
        block = w[g * per_group : (g + 1) * per_group]
        for pos in np.ndindex(*w.shape[2:]):
            out.append(block[(slice(None), slice(None), *pos)])
    return out


def assert_spectrum(stack: torch.Tensor, expected: np.ndarray) -> None:
    got = F.eigenvalues(stack, normalize=False, precision="float64").numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-11 * max(1.0, float(expected.max())))


Expected = list[tuple[str, str, list[np.ndarray]]]  # (name, layer_type, slices)


def assert_matrices(mats: list[WeightMatrix], expected: Expected) -> None:
    """Names in order, layer types, tall shapes, slice counts and pooled eigenvalues."""
    assert [m.name for m in mats] == [e[0] for e in expected]
    for m, (name, layer_type, slices) in zip(mats, expected):
        assert m.layer_type == layer_type, name
        assert m.layer_type in LAYER_TYPES
        rows = {s.shape[0] for s in slices} | {s.shape[1] for s in slices}
        big, small = max(max(s.shape) for s in slices), min(min(s.shape) for s in slices)
        assert len(rows) <= 2
        assert (m.N, m.M) == (big, small), name
        assert m.N >= m.M
        assert m.Q == pytest.approx(big / small)
        assert m.num_slices == len(slices), name
        assert m.num_evals == small * len(slices)
        assert m.skip_reason is None, name
        assert m.slices is not None
        assert tuple(m.slices.shape) == (len(slices), big, small), name
        assert not m.slices.requires_grad
        assert_spectrum(m.slices, pooled_evals(slices))


def assert_analyze(model: nn.Module, expected: Expected) -> None:
    """``analyze`` rows: identity columns and the eigenvalue sums/maxima (``norm``, ``spectral_norm``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tiny test layers have too few eigenvalues for a power-law fit
        df = lightning_htsr.analyze(model, precision="float64", min_evals=1)
    assert list(df["name"]) == [e[0] for e in expected]
    for (_, row), (name, layer_type, slices) in zip(df.iterrows(), expected):
        ev = pooled_evals(slices)
        n_rows = max(max(s.shape) for s in slices)
        m_cols = min(min(s.shape) for s in slices)
        assert row["layer_type"] == layer_type
        assert (row["N"], row["M"], row["num_slices"], row["num_evals"]) == (n_rows, m_cols, len(slices), ev.size)
        assert row["status"] in ("success", "degenerate"), (name, row["skip_reason"])
        assert row["precision"] == "float64"
        assert row["norm"] == pytest.approx(ev.sum() / n_rows, rel=1e-9)
        assert row["spectral_norm"] == pytest.approx(ev.max() / n_rows, rel=1e-9)
        assert row["stable_rank"] == pytest.approx(ev.sum() / ev.max(), rel=1e-9)


class Conv1D(nn.Module):
    """Stand-in for ``transformers.pytorch_utils.Conv1D`` (GPT-2): weight ``(in, out)``, attribute ``nf``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Custom(nn.Module):
    """A module that is none of the known types but has a 2-D ``weight`` Parameter."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(rows, cols))
        self.scale = nn.Parameter(torch.ones(cols))  # 1-D, not a matrix


class Holder(nn.Module):
    """Wraps one layer under the attribute ``layer`` so every matrix name starts with ``layer``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


# --------------------------------------------------------------------------------------------------------------------
# one case per layer type: (model, expected)


def case_linear() -> tuple[nn.Module, Expected]:
    m = nn.ModuleDict({"wide": nn.Linear(30, 20), "tall": nn.Linear(12, 40), "square": nn.Linear(16, 16)})
    return m, [(k, "linear", [npw(m[k].weight)]) for k in ("wide", "tall", "square")]


def case_embedding() -> tuple[nn.Module, Expected]:
    m = nn.ModuleDict({"emb": nn.Embedding(50, 16), "bag": nn.EmbeddingBag(40, 12, mode="mean")})
    return m, [("emb", "embedding", [npw(m["emb"].weight)]), ("bag", "embedding", [npw(m["bag"].weight)])]


CONV_PARAMS = [
    # (dims, in, out, kernel, groups)
    (1, 6, 10, 3, 1),
    (2, 6, 4, 3, 1),  # odd 3x3, out < in
    (2, 4, 10, 3, 1),  # odd 3x3, out > in
    (2, 7, 5, 5, 1),  # odd 5x5, out < in
    (2, 3, 9, 5, 1),  # odd 5x5, out > in
    (2, 5, 7, 2, 1),  # even 2x2, out > in
    (2, 8, 6, 4, 1),  # even 4x4, out < in
    (2, 6, 6, (3, 2), 1),  # non-square kernel
    (3, 3, 5, (2, 3, 2), 1),
    (2, 8, 12, 3, 2),  # grouped
    (2, 8, 16, 2, 4),  # grouped, 4 groups
    (1, 12, 8, 3, 4),
]


@pytest.mark.parametrize(("dims", "cin", "cout", "kernel", "groups"), CONV_PARAMS)
def test_conv(dims: int, cin: int, cout: int, kernel: int | tuple[int, ...], groups: int) -> None:
    seeded(dims * 100 + cin * 10 + cout)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    conv = cls(cin, cout, kernel, groups=groups)
    model = Holder(conv)
    k = math.prod(conv.kernel_size)
    mats = weight_matrices(model)
    slices = conv_slices(conv.weight, groups)
    assert len(slices) == groups * k
    assert_matrices(mats, [("layer", f"conv{dims}d", slices)])
    per_group_out, per_group_in = cout // groups, cin // groups
    assert (mats[0].N, mats[0].M) == (max(per_group_out, per_group_in), min(per_group_out, per_group_in))
    assert mats[0].module_type == cls.__name__
    assert_analyze(model, [("layer", f"conv{dims}d", slices)])


CONV_T_PARAMS = [
    (1, 6, 4, 3, 1),
    (1, 3, 8, 2, 1),
    (2, 4, 9, 3, 1),
    (2, 10, 4, 2, 1),
    (2, 4, 6, 2, 2),  # grouped transpose: weight (in, out/g, k, k)
    (2, 8, 12, 3, 4),
    (3, 4, 6, 2, 1),
]


@pytest.mark.parametrize(("dims", "cin", "cout", "kernel", "groups"), CONV_T_PARAMS)
def test_conv_transpose(dims: int, cin: int, cout: int, kernel: int, groups: int) -> None:
    seeded(dims * 100 + cin * 10 + cout + 7)
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    conv = cls(cin, cout, kernel, groups=groups)
    assert tuple(conv.weight.shape[:2]) == (cin, cout // groups)
    model = Holder(conv)
    slices = conv_slices(conv.weight, groups, transposed=True)
    assert all(s.shape == (cin // groups, cout // groups) for s in slices)
    mats = weight_matrices(model)
    assert_matrices(mats, [("layer", f"conv_transpose{dims}d", slices)])
    assert mats[0].num_slices == groups * kernel**dims
    assert_analyze(model, [("layer", f"conv_transpose{dims}d", slices)])


def test_grouped_conv_is_not_the_ungrouped_reshape() -> None:
    """Per-group slices have a different spectrum from treating the whole (out, in/g) block as one slice."""
    seeded(3)
    conv = nn.Conv2d(8, 12, 3, groups=2)
    mats = weight_matrices(Holder(conv))
    assert (mats[0].num_slices, mats[0].N, mats[0].M) == (18, 6, 4)
    whole = [npw(conv.weight)[:, :, i, j] for i, j in itertools.product(range(3), range(3))]  # 12 x 4 per position
    wrong = pooled_evals(whole)
    got = F.eigenvalues(mats[0].slices, normalize=False, precision="float64").numpy()
    assert got.size == 72 and wrong.size == 36
    np.testing.assert_allclose(got, pooled_evals(conv_slices(conv.weight, 2)), rtol=1e-9)


@pytest.mark.parametrize(("cin", "mult", "dims"), [(6, 1, 2), (4, 2, 2), (5, 1, 1)])
def test_depthwise_conv_is_skipped(cin: int, mult: int, dims: int) -> None:
    """groups == in: every slice has a single column (1x1 or mult x 1) -> kept as a skipped record."""
    seeded(4)
    cls = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
    model = nn.ModuleDict({"dw": cls(cin, cin * mult, 3, groups=cin), "pw": cls(cin * mult, 8, 1)})
    mats = weight_matrices(model)
    assert [m.name for m in mats] == ["dw", "pw"]
    dw, pw = mats
    assert dw.skip_reason is not None and "single column" in dw.skip_reason
    assert dw.slices is None
    assert dw.layer_type == f"conv{dims}d"
    assert (dw.N, dw.M, dw.num_slices) == (mult, 1, cin * 3**dims)
    assert pw.skip_reason is None
    assert_spectrum(pw.slices, pooled_evals(conv_slices(model["pw"].weight, 1)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = lightning_htsr.analyze(model, min_evals=1)
    row = df.set_index("name").loc["dw"]
    assert row["status"] == "skipped" and "single column" in row["skip_reason"]
    assert df.set_index("name").loc["pw", "status"] != "skipped"
    ours = [str(w.message) for w in caught if "lightning-htsr" in str(w.message)]
    assert not any("dw (" in msg for msg in ours), "a routine skip must not warn"


def test_linear_and_embedding() -> None:
    seeded(1)
    for build in (case_linear, case_embedding):
        model, expected = build()
        mats = weight_matrices(model)
        assert_matrices(mats, expected)
        assert_analyze(model, expected)
    mats = weight_matrices(case_embedding()[0])
    assert [m.module_type for m in mats] == ["Embedding", "EmbeddingBag"]
    assert [(m.N, m.M) for m in mats] == [(50, 16), (40, 12)]


def test_linear_orientation() -> None:
    seeded(2)
    wide = nn.Linear(30, 20)  # weight (20, 30)
    tall = nn.Linear(12, 40)  # weight (40, 12)
    mats = weight_matrices(nn.ModuleDict({"wide": wide, "tall": tall}))
    assert [(m.N, m.M, m.num_slices) for m in mats] == [(30, 20, 1), (40, 12, 1)]
    # the wide weight is stored transposed: rows of the slice are the weight's columns
    torch.testing.assert_close(mats[0].slices[0], wide.weight.detach().T)
    torch.testing.assert_close(mats[1].slices[0], tall.weight.detach())


def mha_expected(prefix: str, mha: nn.MultiheadAttention) -> Expected:
    if mha.in_proj_weight is not None:
        w = npw(mha.in_proj_weight)
        e = mha.embed_dim
        parts = [w[:e], w[e : 2 * e], w[2 * e :]]
    else:
        parts = [npw(mha.q_proj_weight), npw(mha.k_proj_weight), npw(mha.v_proj_weight)]
    out: Expected = [(f"{prefix}.in_proj.{s}", "attention_in_proj", [p]) for s, p in zip("qkv", parts)]
    out.append((f"{prefix}.out_proj", "linear", [npw(mha.out_proj.weight)]))
    return out


def test_multihead_attention_fused() -> None:
    seeded(5)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(16, 4)})
    mha = model["attn"]
    assert mha.in_proj_weight is not None and mha.in_proj_weight.shape == (48, 16)
    mats = weight_matrices(model)
    expected = mha_expected("attn", mha)
    assert_matrices(mats, expected)
    assert [(m.N, m.M) for m in mats] == [(16, 16)] * 4
    assert [m.module_type for m in mats] == ["MultiheadAttention"] * 3 + ["NonDynamicallyQuantizableLinear"]
    # the three blocks really are different rows of in_proj_weight
    w = mha.in_proj_weight.detach()
    for m, block in zip(mats[:3], w.chunk(3)):
        torch.testing.assert_close(m.slices[0], block.T if block.shape[0] < block.shape[1] else block)
    assert_analyze(model, expected)


def test_multihead_attention_separate_kdim_vdim() -> None:
    seeded(6)
    model = nn.ModuleDict({"xattn": nn.MultiheadAttention(16, 2, kdim=8, vdim=24)})
    mha = model["xattn"]
    assert mha.in_proj_weight is None
    mats = weight_matrices(model)
    expected = mha_expected("xattn", mha)
    assert_matrices(mats, expected)
    assert [(m.name, m.N, m.M) for m in mats] == [
        ("xattn.in_proj.q", 16, 16),
        ("xattn.in_proj.k", 16, 8),
        ("xattn.in_proj.v", 24, 16),
        ("xattn.out_proj", 16, 16),
    ]
    assert_analyze(model, expected)


def test_transformer_encoder() -> None:
    seeded(7)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=40, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    model = nn.ModuleDict({"enc": enc})
    expected: Expected = []
    for i in range(2):
        blk = enc.layers[i]
        expected += mha_expected(f"enc.layers.{i}.self_attn", blk.self_attn)
        expected.append((f"enc.layers.{i}.linear1", "linear", [npw(blk.linear1.weight)]))
        expected.append((f"enc.layers.{i}.linear2", "linear", [npw(blk.linear2.weight)]))
    mats = weight_matrices(model)
    assert_matrices(mats, expected)
    assert not any("norm" in m.name for m in mats)
    # the two layers are deep copies with their own parameters: nothing is treated as tied
    assert all(m.aliases == [] for m in mats)
    names = [m.name for m in weight_matrices(enc)]
    assert names[:6] == [
        "layers.0.self_attn.in_proj.q",
        "layers.0.self_attn.in_proj.k",
        "layers.0.self_attn.in_proj.v",
        "layers.0.self_attn.out_proj",
        "layers.0.linear1",
        "layers.0.linear2",
    ]
    assert_analyze(model, expected)


def rnn_expected(prefix: str, rnn: nn.RNNBase, gates: str | None) -> Expected:
    layer_type = {"LSTM": "lstm", "GRU": "gru"}.get(rnn.mode, "rnn")
    out: Expected = []
    for pname in rnn._flat_weights_names:
        if not pname.startswith("weight"):
            continue
        w = npw(getattr(rnn, pname))
        if gates is None or pname.startswith("weight_hr"):
            out.append((f"{prefix}.{pname}", layer_type, [w]))
        else:
            h = w.shape[0] // len(gates)
            assert h * len(gates) == w.shape[0]
            out += [(f"{prefix}.{pname}.{g}", layer_type, [w[i * h : (i + 1) * h]]) for i, g in enumerate(gates)]
    return out


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("LSTM", {}),
        ("LSTM", {"num_layers": 2, "bidirectional": True}),
        ("LSTM", {"proj_size": 4}),
        ("GRU", {}),
        ("GRU", {"num_layers": 2}),
        ("RNN", {}),
        ("RNN", {"nonlinearity": "relu", "bidirectional": True}),
    ],
)
def test_recurrent(kind: str, kwargs: dict) -> None:
    seeded(8)
    rnn = getattr(nn, kind)(10, 6, **kwargs)
    model = nn.ModuleDict({"rnn": rnn})
    gates = {"LSTM": "ifgo", "GRU": "rzn", "RNN": None}[kind]
    expected = rnn_expected("rnn", rnn, gates)
    mats = weight_matrices(model)
    assert_matrices(mats, expected)
    names = [m.name for m in mats]
    if kind == "LSTM":
        assert names[:4] == ["rnn.weight_ih_l0.i", "rnn.weight_ih_l0.f", "rnn.weight_ih_l0.g", "rnn.weight_ih_l0.o"]
        assert mats[0].layer_type == "lstm"
        assert (mats[0].N, mats[0].M) == (10, 6)
    if kind == "GRU":
        assert names[:3] == ["rnn.weight_ih_l0.r", "rnn.weight_ih_l0.z", "rnn.weight_ih_l0.n"]
        assert names[3:6] == ["rnn.weight_hh_l0.r", "rnn.weight_hh_l0.z", "rnn.weight_hh_l0.n"]
    if kind == "RNN":
        assert names[:2] == ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]
        assert all(m.layer_type == "rnn" for m in mats)
    if kwargs.get("bidirectional") and kind == "LSTM":
        assert "rnn.weight_ih_l0_reverse.i" in names and "rnn.weight_hh_l1_reverse.o" in names
    if kwargs.get("proj_size"):
        assert "rnn.weight_hr_l0" in names
        hr = mats[names.index("rnn.weight_hr_l0")]
        assert (hr.N, hr.M) == (6, 4)  # weight_hr_l0 is (proj_size, hidden) = (4, 6), unsplit
        assert (mats[names.index("rnn.weight_hh_l0.i")].N, mats[names.index("rnn.weight_hh_l0.i")].M) == (6, 4)
    assert_analyze(model, expected)


def test_lstm_gate_blocks_are_the_pytorch_gates() -> None:
    """Gate ``g`` of ``weight_ih_l0`` is rows ``2H:3H`` (PyTorch's i, f, g, o order), not some other cut."""
    seeded(9)
    lstm = nn.LSTM(12, 5)
    mats = {m.name: m for m in weight_matrices(nn.ModuleDict({"lstm": lstm}))}
    w = lstm.weight_ih_l0.detach()
    for i, g in enumerate("ifgo"):
        torch.testing.assert_close(mats[f"lstm.weight_ih_l0.{g}"].slices[0], w[i * 5 : (i + 1) * 5].T)


def test_transformers_conv1d_standin() -> None:
    seeded(10)
    model = nn.ModuleDict({"c_attn": Conv1D(nf=36, nx=12), "c_proj": Conv1D(nf=8, nx=20)})
    assert layer_type_of(model["c_attn"]) == "transformers_conv1d"
    mats = weight_matrices(model)
    expected = [(k, "transformers_conv1d", [npw(model[k].weight)]) for k in ("c_attn", "c_proj")]
    assert_matrices(mats, expected)
    assert [(m.N, m.M, m.module_type) for m in mats] == [(36, 12, "Conv1D"), (20, 8, "Conv1D")]
    assert_analyze(model, expected)


def test_custom_module_with_2d_weight_is_other() -> None:
    seeded(11)
    model = nn.ModuleDict({"custom": Custom(9, 25), "ln": nn.LayerNorm(25), "bn": nn.BatchNorm1d(25)})
    mats = weight_matrices(model)
    expected = [("custom", "other", [npw(model["custom"].weight)])]
    assert_matrices(mats, expected)
    assert mats[0].module_type == "Custom"
    assert layer_type_of(model["ln"]) is None and layer_type_of(model["bn"]) is None
    assert_analyze(model, expected)


def test_norm_layers_and_containers_are_not_matrices() -> None:
    seeded(12)
    model = nn.Sequential(
        nn.Linear(16, 32),
        nn.LayerNorm(32),
        nn.BatchNorm1d(32),
        nn.GroupNorm(4, 32),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(32, 8),
    )
    assert [m.name for m in weight_matrices(model)] == ["0", "6"]
    df = lightning_htsr.analyze(model)
    assert list(df["name"]) == ["0", "6"]


# --------------------------------------------------------------------------------------------------------------------
# sharing, freezing, selecting


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 60, dim: int = 16, head_first: bool = False) -> None:
        super().__init__()
        if head_first:
            self.head = nn.Linear(dim, vocab, bias=False)
            self.body = nn.Linear(dim, dim)
            self.emb = nn.Embedding(vocab, dim)
            self.emb.weight = self.head.weight
        else:
            self.emb = nn.Embedding(vocab, dim)
            self.body = nn.Linear(dim, dim)
            self.head = nn.Linear(dim, vocab, bias=False)
            self.head.weight = self.emb.weight


def test_tied_embeddings_analyzed_once() -> None:
    seeded(13)
    model = TiedLM()
    assert model.head.weight is model.emb.weight
    mats = weight_matrices(model)
    assert [m.name for m in mats] == ["emb", "body"]
    assert mats[0].aliases == ["head"]
    assert mats[0].layer_type == "embedding"
    assert (mats[0].N, mats[0].M) == (60, 16)
    assert_spectrum(mats[0].slices, pooled_evals([npw(model.emb.weight)]))
    assert mats[1].aliases == []
    df = lightning_htsr.analyze(model)
    assert list(df["name"]) == ["emb", "body"]

    first_head = weight_matrices(TiedLM(head_first=True))
    assert [m.name for m in first_head] == ["head", "body"]
    assert first_head[0].aliases == ["emb"]
    assert first_head[0].layer_type == "linear"


def test_tied_weights_in_a_state_dict_analyzed_once(tmp_path) -> None:
    seeded(13)
    model = TiedLM()
    path = tmp_path / "tied.pt"
    torch.save(model.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["head.weight"] is not loaded["emb.weight"]  # distinct tensors, one storage
    for sd in (model.state_dict(), loaded):
        mats = state_dict_matrices(sd)
        assert [m.name for m in mats] == ["emb", "body"]
        assert mats[0].aliases == ["head"] and mats[1].aliases == []
        assert all(m.module_type == "state_dict" for m in mats)
        assert_spectrum(mats[0].slices, pooled_evals([npw(model.emb.weight)]))
    # a filter that drops the first name keeps the tied weight under the other one, as for the model itself
    assert [m.name for m in weight_matrices(model, include="head")] == ["head"]
    assert [m.name for m in state_dict_matrices(loaded, include="head")] == ["head"]


def test_frozen_layers_are_analyzed() -> None:
    seeded(14)
    model = nn.Sequential(nn.Linear(20, 40), nn.Linear(40, 30))
    model[0].requires_grad_(False)
    assert not model[0].weight.requires_grad
    expected = [("0", "linear", [npw(model[0].weight)]), ("1", "linear", [npw(model[1].weight)])]
    assert_matrices(weight_matrices(model), expected)
    df = lightning_htsr.analyze(model)
    assert list(df["status"]) == ["success", "success"]
    assert_analyze(model, expected)


def zoo() -> nn.Module:
    seeded(15)
    return nn.ModuleDict(
        {
            "enc_emb": nn.Embedding(30, 12),
            "enc_bag": nn.EmbeddingBag(25, 10),
            "enc_fc": nn.Linear(12, 24),
            "conv": nn.Conv2d(3, 6, 3),
            "attn": nn.MultiheadAttention(12, 2),
            "dec_fc": nn.Linear(24, 12),
            "head": nn.Linear(12, 5),
        }
    )


ZOO_NAMES = [
    "enc_emb",
    "enc_bag",
    "enc_fc",
    "conv",
    "attn.in_proj.q",
    "attn.in_proj.k",
    "attn.in_proj.v",
    "attn.out_proj",
    "dec_fc",
    "head",
]


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({}, ZOO_NAMES),
        ({"include": "^enc"}, ["enc_emb", "enc_bag", "enc_fc"]),
        ({"include": ["fc$", "^head"]}, ["enc_fc", "dec_fc", "head"]),
        ({"exclude": "attn"}, ["enc_emb", "enc_bag", "enc_fc", "conv", "dec_fc", "head"]),
        ({"exclude": ["^enc", r"\.[kv]$", "head"]}, ["conv", "attn.in_proj.q", "attn.out_proj", "dec_fc"]),
        ({"include": "attn", "exclude": "out_proj"}, ["attn.in_proj.q", "attn.in_proj.k", "attn.in_proj.v"]),
        ({"include": r"in_proj\.q$"}, ["attn.in_proj.q"]),
        ({"include": "no_such_layer"}, []),
        ({"layer_types": ["conv2d"]}, ["conv"]),
        ({"layer_types": ["Linear"]}, ["enc_fc", "dec_fc", "head"]),
        ({"layer_types": ["linear"]}, ["enc_fc", "attn.out_proj", "dec_fc", "head"]),
        ({"layer_types": [nn.Embedding]}, ["enc_emb"]),
        ({"layer_types": ["EmbeddingBag"]}, ["enc_bag"]),
        ({"layer_types": ["embedding"]}, ["enc_emb", "enc_bag"]),
        ({"layer_types": [nn.Linear]}, ["enc_fc", "attn.out_proj", "dec_fc", "head"]),
        ({"layer_types": ["attention_in_proj", nn.Conv2d]}, ["conv", "attn.in_proj.q", "attn.in_proj.k",
                                                            "attn.in_proj.v"]),
        ({"layer_types": ["MultiheadAttention"]}, ["attn.in_proj.q", "attn.in_proj.k", "attn.in_proj.v"]),
        ({"layer_types": ["linear"], "include": "^enc|^dec"}, ["enc_fc", "dec_fc"]),
        ({"layer_types": []}, []),
    ],
)
def test_selection(kwargs: dict, names: list[str]) -> None:
    model = zoo()
    mats = weight_matrices(model, **kwargs)
    assert [m.name for m in mats] == names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "head" has 5 eigenvalues: degenerate fit, warned about
        df = lightning_htsr.analyze(model, min_evals=1, **kwargs)
    assert list(df["name"]) == names
    # selection does not change what is computed for the kept matrices
    full = {m.name: m for m in weight_matrices(model)}
    for m in mats:
        torch.testing.assert_close(m.slices, full[m.name].slices, rtol=0, atol=0)


def test_min_and_max_evals() -> None:
    seeded(16)
    model = nn.ModuleDict({"lin": nn.Linear(20, 30), "conv": nn.Conv2d(4, 10, 3), "big": nn.Linear(64, 64)})
    # pooled eigenvalue counts: lin 20, conv 4*9 = 36, big 64
    base = weight_matrices(model)
    assert [m.num_evals for m in base] == [20, 36, 64]

    mats = weight_matrices(model, min_evals=30)
    assert [m.name for m in mats] == ["lin", "conv", "big"]
    lin, conv, big = mats
    assert lin.skip_reason == "20 eigenvalues < min_evals=30"
    assert lin.slices is None
    assert (lin.N, lin.M, lin.num_slices, lin.layer_type) == (30, 20, 1, "linear")
    assert conv.skip_reason is None and big.skip_reason is None

    mats = weight_matrices(model, max_evals=40)
    lin, conv, big = mats
    assert lin.skip_reason is None and conv.skip_reason is None
    assert big.skip_reason == "64 eigenvalues > max_evals=40"
    assert big.slices is None

    mats = weight_matrices(model, min_evals=36, max_evals=36)  # both bounds inclusive
    assert [m.skip_reason is None for m in mats] == [False, True, False]
    assert "min_evals" in mats[0].skip_reason and "max_evals" in mats[2].skip_reason
    assert (mats[1].N, mats[1].M, mats[1].num_slices) == (10, 4, 9)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = lightning_htsr.analyze(model, min_evals=30, max_evals=40).set_index("name")
    # min_evals is the minimum spectrum size to classify: lin (20 eigenvalues) keeps its row and raw alpha,
    # unclassified; conv (36) is classified; big is over max_evals and skipped
    assert list(df["status"]) == ["success", "success", "skipped"]
    assert not isinstance(df.loc["lin", "phase"], str) and "20 non-zero eigenvalues < 30" in df.loc["lin", "phase_reason"]
    assert df.loc["conv", "phase"] is not None and "max_evals=40" in df.loc["big", "skip_reason"]
    assert df.loc["conv", "skip_reason"] == ""
    assert (df.loc["lin", "N"], df.loc["lin", "M"], df.loc["big", "num_evals"]) == (30, 20, 64)
    assert math.isfinite(df.loc["lin", "alpha"]) and math.isnan(df.loc["big", "norm"])
    assert not [w for w in caught if "lightning-htsr" in str(w.message)], "size skips are routine: no warning"


def test_analyze_default_min_evals_skips_small_layers() -> None:
    seeded(17)
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 4))  # 4 eigenvalues < default min_evals 10
    df = lightning_htsr.analyze(model).set_index("name")
    assert df.loc["0", "status"] == "success"
    assert df.loc["1", "status"] == "skipped"
    assert "min_evals=10" in df.loc["1", "skip_reason"]


def test_weight_matrix_from_tensor() -> None:
    seeded(18)
    w = torch.randn(7, 19)
    m = WeightMatrix.from_tensor("w", w)
    assert (m.name, m.layer_type, m.module_type, m.N, m.M, m.num_slices) == ("w", "other", "Tensor", 19, 7, 1)
    assert m.dtype == "torch.float32"
    assert m.skip_reason is None and m.aliases == []
    assert tuple(m.slices.shape) == (1, 19, 7)
    assert m.Q == pytest.approx(19 / 7)
    assert m.num_evals == 7
    assert_spectrum(m.slices, pooled_evals([npw(w)]))

    stack = torch.randn(4, 3, 11, dtype=torch.float64)
    s = WeightMatrix.from_tensor("s", stack, layer_type="conv2d")
    assert (s.layer_type, s.N, s.M, s.num_slices, s.num_evals) == ("conv2d", 11, 3, 4, 12)
    assert s.dtype == "torch.float64"
    assert_spectrum(s.slices, pooled_evals([npw(x) for x in stack]))

    p = nn.Parameter(torch.randn(5, 3))
    assert not WeightMatrix.from_tensor("p", p).slices.requires_grad

    with pytest.raises(ValueError, match="2-D"):
        WeightMatrix.from_tensor("v", torch.randn(5))
    with pytest.raises(ValueError, match="2-D"):
        WeightMatrix.from_tensor("t", torch.randn(2, 2, 2, 2))

    # from_tensor output goes through analyze_matrices like an extracted layer
    from lightning_htsr.analysis import AnalysisOptions, analyze_matrices

    big = torch.randn(120, 60)
    res = analyze_matrices([WeightMatrix.from_tensor("big", big)], AnalysisOptions(precision="float64"))[0]
    ev = pooled_evals([npw(big)]) / 120
    np.testing.assert_allclose(res.eigenvalues.numpy(), ev, rtol=1e-9, atol=1e-12)
    assert res.record["status"] == "success" and res.record["N"] == 120


def test_every_layer_type_in_one_model() -> None:
    """All the layer kinds together: extraction order is named_modules order and nothing interferes."""
    seeded(19)
    model = nn.ModuleDict(
        {
            "emb": nn.Embedding(40, 12),
            "conv": nn.Conv2d(3, 8, 3),
            "convt": nn.ConvTranspose1d(6, 4, 3),
            "attn": nn.MultiheadAttention(12, 3),
            "lstm": nn.LSTM(12, 5),
            "gpt": Conv1D(nf=24, nx=12),
            "custom": Custom(10, 14),
            "fc": nn.Linear(12, 7),
        }
    )
    expected: Expected = [
        ("emb", "embedding", [npw(model["emb"].weight)]),
        ("conv", "conv2d", conv_slices(model["conv"].weight, 1)),
        ("convt", "conv_transpose1d", conv_slices(model["convt"].weight, 1, transposed=True)),
        *mha_expected("attn", model["attn"]),
        *rnn_expected("lstm", model["lstm"], "ifgo"),
        ("gpt", "transformers_conv1d", [npw(model["gpt"].weight)]),
        ("custom", "other", [npw(model["custom"].weight)]),
        ("fc", "linear", [npw(model["fc"].weight)]),
    ]
    mats = weight_matrices(model)
    assert_matrices(mats, expected)
    assert {m.layer_type for m in mats} == {
        "embedding", "conv2d", "conv_transpose1d", "attention_in_proj", "linear", "lstm", "transformers_conv1d",
        "other",
    }  # fmt: skip
    assert_analyze(model, expected)


def test_extraction_does_not_touch_weights() -> None:
    seeded(20)
    model = nn.ModuleDict({"conv": nn.Conv2d(4, 6, 3, groups=2), "lstm": nn.LSTM(6, 4), "fc": nn.Linear(6, 9)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    weight_matrices(model)
    lightning_htsr.analyze(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads



# ---------------------------------------------------------------------------------------------- module forms


def _rows(frame):
    return frame[["name", "N", "M", "num_slices", "status"]].values.tolist(), frame["alpha"].to_numpy(float)


def test_recurrent_cells_are_split_per_gate_like_their_layers_also_through_a_state_dict() -> None:
    import lightning_htsr as htsr

    torch.manual_seed(0)
    model = nn.ModuleDict({"lstm": nn.LSTMCell(96, 32), "gru": nn.GRUCell(96, 48), "rnn": nn.RNNCell(96, 40)})
    table = htsr.analyze(model)
    gates = {"lstm": "ifgo", "gru": "rzn", "rnn": ""}
    expected = [f"{cell}.{w}" + (f".{g}" if g else "") for cell, names in gates.items()
                for w in ("weight_ih", "weight_hh") for g in (names or [""])]
    assert table["name"].tolist() == expected
    assert set(table.loc[table["name"].str.startswith("lstm."), "layer_type"]) == {"lstm"}
    first_gate = model["lstm"].weight_ih.detach()[:32]
    row = table.set_index("name").loc["lstm.weight_ih.i"]
    assert (row["N"], row["M"]) == (96, 32)
    np.testing.assert_allclose(row["alpha"], htsr.analyze_state_dict({"x.weight": first_gate})["alpha"][0], rtol=1e-12)
    names, alphas = _rows(table)
    sd_names, sd_alphas = _rows(htsr.analyze_state_dict(model.state_dict()))
    assert sd_names == names
    np.testing.assert_allclose(sd_alphas, alphas, rtol=1e-12, equal_nan=True)


def test_torchscript_modules_are_analyzed_from_their_parameters() -> None:
    import lightning_htsr as htsr

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.LSTM(48, 24))
    names, alphas = _rows(htsr.analyze(model))
    scripted = htsr.analyze(torch.jit.script(model))
    assert _rows(scripted)[0] == names
    np.testing.assert_allclose(_rows(scripted)[1], alphas, rtol=1e-12, equal_nan=True)
    assert scripted["module_type"].tolist()[:2] == ["Linear", "Conv2d"]
    # a traced submodule inside an ordinary model
    traced = torch.jit.trace(nn.Sequential(nn.Linear(64, 128), nn.ReLU()), torch.randn(2, 64))
    mixed = htsr.analyze(nn.Sequential(traced, nn.Linear(128, 64)))
    assert mixed["name"].tolist() == ["0.0", "1"] and set(mixed["status"]) == {"success"}


def test_a_weight_of_another_rank_gets_a_row_with_a_skip_reason() -> None:
    import lightning_htsr as htsr

    table = htsr.analyze(nn.ModuleDict({"bilinear": nn.Bilinear(20, 30, 40), "fc": nn.Linear(64, 80)}))
    row = table.set_index("name").loc["bilinear"]
    assert row["status"] == "skipped" and row["module_type"] == "Bilinear"
    assert row["skip_reason"] == "weight of rank 3 (shape 40x20x30) is not a matrix; not analyzed"
    assert table.set_index("name").loc["fc", "status"] == "success"
    # a state dict cannot tell (out, in, k) from a Conv1d; rank 6+ has no reading at all
    sd = htsr.analyze_state_dict({"odd.weight": torch.randn(2, 3, 4, 5, 6, 7)})
    assert sd["status"].tolist() == ["skipped"] and "weight of rank 6" in sd["skip_reason"][0]


class _Experts(nn.Module):
    """A mixture-of-experts block as ``transformers`` keeps one: stacked ``(experts, rows, cols)`` parameters and no
    ``weight`` of its own."""

    def __init__(self, experts: int, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inner))


def test_mixture_of_experts_stacks_are_one_matrix_per_expert() -> None:
    """Each expert of a stacked parameter is its own matrix, live and through a state dict (3-D weights outside
    convolutions were dropped without a row before); a fused gate/up projection says so in its note."""
    seeded(23)
    model = nn.ModuleDict({"experts": _Experts(3, 12, 20), "fc": nn.Linear(12, 7)})
    stacks = {"experts.gate_up_proj": model["experts"].gate_up_proj, "experts.down_proj": model["experts"].down_proj}
    expected: Expected = [(f"{name}.{e}", "experts", [npw(p[e])]) for name, p in stacks.items() for e in range(3)]
    expected.append(("fc", "linear", [npw(model["fc"].weight)]))
    mats = weight_matrices(model)
    assert_matrices(mats, expected)
    assert_analyze(model, expected)
    assert all("fused gate and up" in m.note for m in mats if "gate_up" in m.name)
    assert_matrices(state_dict_matrices(model.state_dict()), expected)
    assert [m.name for m in weight_matrices(model, layer_types=["experts"])] == [e[0] for e in expected[:-1]]


def test_transformers_mixtral_experts_live_and_from_its_checkpoint(tmp_path) -> None:
    """A real ``transformers`` Mixtral: every expert is analyzed live (one row each, none dropped), and each
    expert's down projection has the alpha of the same expert's ``w2`` in the checkpoint ``save_pretrained`` writes
    (which stores the experts one matrix each)."""
    transformers = pytest.importorskip("transformers")
    seeded(0)
    config = transformers.MixtralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_hidden_layers=1)
    model = transformers.MixtralForCausalLM(config)
    stacks = {name: p for name, p in model.named_parameters() if p.dim() == 3}
    live = lightning_htsr.analyze(model)
    expert_rows = live[live["layer_type"] == "experts"]
    if not stacks:  # this transformers keeps one Linear per expert: nothing stacked to check
        assert expert_rows.empty
        return
    assert sorted(expert_rows["name"]) == sorted(f"{n}.{e}" for n, p in stacks.items() for e in range(p.shape[0]))
    assert (expert_rows["status"] == "success").all()
    model.save_pretrained(tmp_path)
    disk = lightning_htsr.analyze_checkpoint(tmp_path).set_index("name")["alpha"]
    per_expert = [name for name in disk.index if re.search(r"experts\.0\.w2$", name)]
    if not per_expert:  # saved stacked too: the same rows as live
        assert sorted(n for n in disk.index if "expert" in n) == sorted(expert_rows["name"])
        return
    downs = expert_rows[expert_rows["name"].str.contains("down_proj")].set_index("name")["alpha"]
    for name, alpha in downs.items():
        expert = name.rsplit(".", 1)[1]
        match = [n for n in disk.index if n.endswith(f"experts.{expert}.w2")]
        assert len(match) == 1 and disk[match[0]] == pytest.approx(alpha, rel=1e-9), name
