"""CNFA (docs/math.md 7): conv-layer patch AGOPs against analytic values and finite differences."""

import numpy as np
import pytest
import torch
from conftest import rel_err
from torch import nn

from ray_convrfm.cnfa.measure import (
    conv_layers,
    initial_copy,
    layer_patch_agops,
    measure_cnfa,
    pearson,
    to_table,
)
from ray_convrfm.tools.viz import plot_cnfa


class SmallCNN(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, dilation=2)
        self.head = nn.Linear(6 * 1 * 1, classes)

    def forward(self, x):
        y = torch.tanh(self.conv1(x))
        y = torch.relu(self.conv2(y))
        return self.head(y.mean((2, 3)))

    def from_conv1_patches(self, patches, out_hw):
        """The same network with conv1 computed from given (n, P, d) patches."""
        W = self.conv1.weight.reshape(4, -1)
        y = (patches @ W.T + self.conv1.bias).transpose(1, 2).reshape(-1, 4, *out_hw)
        y = torch.relu(self.conv2(torch.tanh(y)))
        return self.head(y.mean((2, 3)))


def test_linear_readout_gives_the_analytic_agop():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1).double()
    readout = nn.Linear(5 * 4 * 4, 7, bias=False).double()
    model = nn.Sequential(conv, nn.Flatten(), readout)
    X = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    G = layer_patch_agops(model, X)["0"]
    # f_k = A_k . vec(y): d f_k / d y_p = A_k[:, p] for every image
    A = readout.weight.detach().reshape(7, 5, 16)
    S = torch.einsum("kfp,kgp->fg", A, A)
    W = conv.weight.detach().reshape(5, -1)
    assert rel_err(G, W.T @ S @ W) < 1e-12


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_patch_agop_matches_finite_differences(chunk):
    torch.manual_seed(1)
    model = SmallCNN().double()
    X = torch.randn(3, 2, 9, 9, dtype=torch.float64)
    G = layer_patch_agops(model, X, layers=["conv1"], class_chunk=chunk)["conv1"]
    patches = nn.functional.unfold(X, 3, padding=1, stride=2).transpose(1, 2)  # (n, P, d)
    out_hw = (5, 5)
    n, P, d = patches.shape
    h = 1e-6
    g = torch.zeros(n, P, 5, d, dtype=torch.float64)
    with torch.no_grad():
        for p in range(P):
            for e in range(d):
                up, down = patches.clone(), patches.clone()
                up[:, p, e] += h
                down[:, p, e] -= h
                g[:, p, :, e] = (model.from_conv1_patches(up, out_hw)
                                 - model.from_conv1_patches(down, out_hw)) / (2 * h)
    g = g.reshape(-1, d)
    assert rel_err(G, g.T @ g / n) < 1e-6


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.bn(self.b(torch.relu(self.a(x)))))
        return self.fc(x.mean((2, 3)))


def test_residual_network_table_and_plot(tmp_path):
    torch.manual_seed(2)
    model = Residual()
    init = initial_copy(model)
    with torch.no_grad():
        for conv in (model.a, model.b):
            conv.weight.mul_(1.5)
    rows = measure_cnfa(model, torch.randn(8, 3, 10, 10), initial_model=init, class_chunk=4)
    assert [r.layer for r in rows] == [n for n, _ in conv_layers(model)] == ["stem", "a", "b"]
    for r in rows:
        assert -1 <= r.corr_power_1 <= 1 and -1 <= r.corr_power_half <= 1
        assert r.init_corr_power_half is not None
    table = to_table(rows)
    assert table.num_rows == 3 and "corr_power_half" in table.column_names
    assert plot_cnfa(rows, tmp_path / "cnfa.png").read_bytes()[:4] == b"\x89PNG"


def test_pearson_and_errors():
    A = torch.randn(4, 4)
    assert pearson(A, 3 * A + 1) == pytest.approx(1.0)
    assert pearson(A, -A) == pytest.approx(-1.0)
    model = SmallCNN()
    with pytest.raises(ValueError, match="not conv layers"):
        layer_patch_agops(model, torch.randn(2, 2, 9, 9), layers=["head"])
    with torch.no_grad(), pytest.raises(ValueError, match="no_grad"):
        layer_patch_agops(model, torch.randn(2, 2, 9, 9))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ValueError, match="grouped"):
        layer_patch_agops(grouped, torch.randn(2, 4, 6, 6))


def test_agop_is_the_sum_over_images():
    torch.manual_seed(3)
    model = SmallCNN().double()
    X = torch.randn(6, 2, 9, 9, dtype=torch.float64)
    whole = layer_patch_agops(model, X, batch_size=6)["conv2"]
    parts = layer_patch_agops(model, X, batch_size=4)["conv2"]
    np.testing.assert_allclose(parts.numpy(), whole.numpy(), rtol=1e-10)


class AlexNetShaped(nn.Module):
    """AlexNet's layout at a small scale: stride-4 first conv, max pools, dropout, many classes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(8, 12, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(12, 16, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(64, 300))

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def test_many_classes_in_chunks_match_one_class_at_a_time():
    torch.manual_seed(4)
    model = AlexNetShaped().double().eval()
    X = torch.randn(3, 3, 67, 67, dtype=torch.float64)
    chunked = layer_patch_agops(model, X, class_chunk=128)
    single = layer_patch_agops(model, X, class_chunk=1)
    assert [G.shape for G in chunked.values()] == [(363, 363), (200, 200), (108, 108)]
    for name in chunked:
        assert rel_err(chunked[name], single[name]) < 1e-10


def test_square_root_through_the_small_eigenproblem():
    from ray_convrfm.cnfa.measure import agop_and_root
    from ray_convrfm.kernels.agop import psd_power

    rng = np.random.default_rng(5)
    W = torch.from_numpy(rng.standard_normal((6, 20)))  # F = 6 filters, d = 20
    A = torch.from_numpy(rng.standard_normal((6, 6)))
    S = A @ A.T
    G, root = agop_and_root(W, S, 3)
    torch.testing.assert_close(G, W.T @ S @ W / 3)
    torch.testing.assert_close(root @ root, G, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(root, root.T)
    # eigh of the rank-6 G itself is less accurate: its 14 zero eigenvalues come out as +-1e-15
    # and their square roots as 3e-8
    torch.testing.assert_close(root, psd_power(G, 0.5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["alexnet", "vgg11", "resnet18"])
def test_torchvision_architectures(name):
    torchvision = pytest.importorskip("torchvision")  # optional extra: pip install '.[vision]'
    torch.manual_seed(0)
    net = torchvision.models.get_model(name, weights=None).eval()

    class FirstOutputs(nn.Module):  # 20 of the 1000 classes keep the test quick
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)[:, :20]

    rows = measure_cnfa(FirstOutputs(), torch.randn(2, 3, 112, 112), class_chunk=10,
                        batch_size=2)
    assert [r.layer for r in rows] == ["net." + n for n, _ in conv_layers(net)]
    assert all(np.isfinite(r.corr_power_half) for r in rows)


def test_cnfa_package_does_not_import_the_tools():
    """The library measures; pictures and commands (``ray_convrfm.tools``) sit on top of it."""
    import ast
    from pathlib import Path

    import ray_convrfm.cnfa

    for path in Path(ray_convrfm.cnfa.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("ray_convrfm.tools") for n in names), (path, names)
