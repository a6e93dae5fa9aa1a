import numpy as np
import pytest

from ray_convrfm.tools.viz import plot_cnfa, plot_filters, plot_history, top_filters


def test_top_filters_are_leading_eigenvectors():
    rng = np.random.default_rng(0)
    v = rng.standard_normal(9)
    M = np.outer(v, v) + 0.01 * np.eye(9)
    filters, vals = top_filters(M, 1, 3, count=3)
    assert filters.shape == (3, 1, 3, 3)
    assert vals[0] == pytest.approx(v @ v + 0.01)
    lead = filters[0].reshape(-1)
    assert abs(abs(lead @ v) / np.linalg.norm(v) - 1) < 1e-10
    assert lead[np.abs(lead).argmax()] > 0  # sign fixed
    with pytest.raises(ValueError, match=r"\(27, 27\)"):
        top_filters(M, 3, 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_plots_are_written(tmp_path, channels):
    d = channels * 9
    path = plot_filters(np.eye(d), channels, 3, tmp_path / "f.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    hist = [{"iter": 0, "val_acc": 0.5, "monitor_acc": 0.4},
            {"iter": 1, "val_acc": 0.6, "monitor_acc": 0.5}]
    assert plot_history(hist, tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_history([hist, hist], tmp_path / "h2.png").read_bytes()[:4] == b"\x89PNG"
    ringed = plot_history([hist, hist], tmp_path / "h3.png", chosen=[1, 0])
    assert ringed.read_bytes()[:4] == b"\x89PNG"
    # the chosen M = I and the last learned M, one labelled row each: a taller picture
    learned = np.diag(np.arange(1.0, d + 1))
    two = plot_filters([("chosen: M = I", np.eye(d)), ("last learned", learned)], channels, 3,
                       tmp_path / "f2.png")
    from PIL import Image

    assert Image.open(two).size[1] > 1.5 * Image.open(path).size[1]


def test_effective_filters_compose_the_banks(tmp_path):
    import torch
    import torch.nn.functional as F

    from ray_convrfm.tools.viz import effective_filters, plot_deep_filters

    rng = np.random.default_rng(1)
    W0 = torch.from_numpy(rng.standard_normal((4, 1, 3, 3)))
    A = rng.standard_normal((36, 36))
    layers = [{"M": torch.eye(9), "filters": W0}, {"M": torch.from_numpy(A @ A.T), "filters": None}]
    E, vals = effective_filters(layers, 1, count=2)
    assert E.shape == (2, 1, 5, 5)
    # applying the effective filter to an image equals applying v to the layer-0 features
    x = torch.from_numpy(rng.standard_normal((1, 1, 9, 9)))
    v, _ = top_filters(layers[1]["M"], 4, 3, count=2)
    direct = F.conv2d(F.conv2d(x, W0), torch.from_numpy(v))
    torch.testing.assert_close(F.conv2d(x, torch.from_numpy(E)), direct)
    assert plot_deep_filters(layers, 1, tmp_path / "d.png", count=3).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("baseline", [False, True])
def test_cnfa_plot_is_written(tmp_path, baseline):
    from ray_convrfm.cnfa.measure import CNFARow

    init = {"init_corr_power_1": 0.1, "init_corr_power_half": -0.2} if baseline else {}
    rows = [CNFARow(layer=f"conv{i}", filters=4, d=9, kernel_size=(3, 3), stride=(1, 1),
                    padding=(1, 1), dilation=(1, 1), corr_power_1=0.5, corr_power_half=0.9,
                    **init) for i in range(3)]
    path = plot_cnfa(rows, tmp_path / "cnfa.png", title="CNFA")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_the_cnn_comparison_draws_each_metric_then_the_cnns_gram_and_filters(tmp_path):
    from PIL import Image

    from ray_convrfm.tools.viz import plot_cnn_comparison

    rng = np.random.default_rng(2)
    W = rng.standard_normal((16, 3, 3, 3))
    gram = W.reshape(16, -1).T @ W.reshape(16, -1)
    one = plot_cnn_comparison([("ConvRFM", gram)], W, tmp_path / "c1.png", count=4)
    two = plot_cnn_comparison([("chosen", np.eye(27)), ("learned", gram)], W,
                              tmp_path / "c2.png", count=4)
    assert Image.open(two).size[1] > 1.2 * Image.open(one).size[1]
    with pytest.raises(ValueError, match=r"\(27, 27\)"):
        plot_cnn_comparison([("wrong size", np.eye(9))], W, tmp_path / "c3.png")
