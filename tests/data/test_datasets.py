"""Tests for ray_convrfm.data.datasets: IDX/npz readers, loaders, the noise-frame transform."""

from __future__ import annotations

import gzip
import io
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from ray_convrfm.data import datasets
from ray_convrfm.data.datasets import (
    FASHION_MNIST_CLASSES,
    IDX_FILES,
    ImageDataset,
    digit_in_noise,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_idx_dir,
    load_npz,
    read_idx,
    with_noise_frame,
)

DEBIAN_TRAIN_IMAGES = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

_IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode ``arr`` in the IDX format (big-endian)."""
    arr = np.asarray(arr)
    header = bytes([0, 0, _IDX_CODES[arr.dtype], arr.ndim])
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_idx_dir(
    directory: Path,
    n_train: int = 6,
    n_test: int = 4,
    size: int = 5,
    gz: bool = False,
    dotted: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write the four MNIST-style files with random content; return the raw arrays."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, size, size), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=n_train).astype(np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, size, size), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=n_test).astype(np.uint8),
    }
    for role, canonical in IDX_FILES.items():
        name = canonical.replace("-idx", ".idx") if dotted else canonical
        write_idx(directory / (name + (".gz" if gz else "")), arrays[role], gz=gz)
    return arrays


def small_dataset(n_train: int = 5, n_test: int = 3) -> ImageDataset:
    rng = np.random.default_rng(1)
    return ImageDataset(
        X_train=rng.random((n_train, 1, 4, 4), dtype=np.float32),
        y_train=np.arange(n_train) % 3,
        X_test=rng.random((n_test, 1, 4, 4), dtype=np.float32),
        y_test=np.arange(n_test) % 3,
        name="small",
        classes=("a", "b", "c"),
    )


@pytest.fixture
def no_fashion_locations(tmp_path, monkeypatch):
    """Point every default Fashion-MNIST location at empty temp paths."""
    monkeypatch.delenv(datasets.FASHION_MNIST_ENV_VAR, raising=False)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(datasets, "CACHE_DIR", tmp_path / "cache")
    return tmp_path


# --------------------------------------------------------------------------------------------
# read_idx
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(_IDX_CODES))
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    out = read_idx(write_idx(tmp_path / "a-idx3", arr, gz=gz))
    assert out.shape == arr.shape
    assert out.dtype == arr.dtype  # native byte order, same kind and size
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_read_idx_1d_and_empty(tmp_path):
    np.testing.assert_array_equal(
        read_idx(write_idx(tmp_path / "l", np.arange(7, dtype=np.uint8))), np.arange(7)
    )
    assert read_idx(write_idx(tmp_path / "e", np.zeros((0, 2, 2), np.uint8))).shape == (0, 2, 2)


def test_read_idx_detects_gzip_by_magic_not_suffix(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    gz_no_suffix = tmp_path / "train-images-idx3-ubyte"
    gz_no_suffix.write_bytes(gzip.compress(idx_bytes(arr)))
    plain_with_suffix = tmp_path / "plain.gz"
    plain_with_suffix.write_bytes(idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(gz_no_suffix), arr)
    np.testing.assert_array_equal(read_idx(plain_with_suffix), arr)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated(tmp_path, gz):
    data = idx_bytes(np.ones((4, 5, 5), np.uint8))[:-7]
    path = tmp_path / "t"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_read_idx_trailing_bytes(tmp_path):
    path = tmp_path / "t"
    path.write_bytes(idx_bytes(np.ones((2, 3), np.uint8)) + b"\x00\x00")
    with pytest.raises(ValueError, match="trailing"):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "h"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + b"\x00\x00\x00\x02")
    with pytest.raises(ValueError, match="header"):
        read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        read_idx(path)


def test_read_idx_bad_magic_and_type_code(tmp_path):
    data = bytearray(idx_bytes(np.ones((2, 2), np.uint8)))
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01" + bytes(data[1:]))
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad)
    data[2] = 0x07
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="type code 0x07"):
        read_idx(bad)


def test_read_idx_truncated_gzip_stream(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.ones((50, 50), np.uint8)))[:20])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(path)


# --------------------------------------------------------------------------------------------
# load_idx_dir
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dotted", [False, True])
def test_load_idx_dir(tmp_path, gz, dotted):
    raw = make_idx_dir(tmp_path / "d", gz=gz, dotted=dotted)
    ds = load_idx_dir(tmp_path / "d", name="mine")
    assert ds.name == "mine"
    assert ds.X_train.shape == (6, 1, 5, 5) and ds.X_test.shape == (4, 1, 5, 5)
    assert ds.X_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    np.testing.assert_allclose(ds.X_train[:, 0], raw["train_images"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, raw["test_labels"])
    assert 0.0 <= ds.X_train.min() and ds.X_train.max() <= 1.0
    assert ds.classes == tuple(str(k) for k in range(len(ds.classes)))


def test_load_idx_dir_missing_file_lists_names(tmp_path):
    make_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_idx_dir(tmp_path)
    msg = str(info.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg and "t10k-labels.idx1-ubyte" in msg
    assert "train-images" not in msg  # only what is missing
    assert str(tmp_path) in msg


def test_load_idx_dir_label_count_mismatch(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="do not match"):
        load_idx_dir(tmp_path)


def test_load_idx_dir_rejects_non_uint8_images(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((6, 5, 5), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_idx_dir(tmp_path)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def debian_fashion():
    if not DEBIAN_TRAIN_IMAGES.is_file():
        pytest.skip(f"{DEBIAN_TRAIN_IMAGES} absent (apt-get install dataset-fashion-mnist)")
    return load_fashion_mnist(root=DEBIAN_TRAIN_IMAGES.parent)


def test_fashion_mnist_debian(debian_fashion):
    ds = debian_fashion
    assert ds.name == "fashion-mnist"
    assert ds.X_train.shape == (60000, 1, 28, 28)
    assert ds.X_test.shape == (10000, 1, 28, 28)
    assert ds.X_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.X_train.min() == 0.0 and ds.X_train.max() == 1.0
    assert 0.0 <= ds.X_test.min() and ds.X_test.max() <= 1.0
    np.testing.assert_array_equal(np.unique(ds.y_train), np.arange(10))
    np.testing.assert_array_equal(np.unique(ds.y_test), np.arange(10))
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert ds.classes == FASHION_MNIST_CLASSES and ds.classes[0] == "T-shirt/top"


def test_fashion_mnist_default_search_finds_debian(monkeypatch, tmp_path):
    if not DEBIAN_TRAIN_IMAGES.is_file():
        pytest.skip(f"{DEBIAN_TRAIN_IMAGES} absent")
    monkeypatch.delenv(datasets.FASHION_MNIST_ENV_VAR, raising=False)
    monkeypatch.setattr(datasets, "CACHE_DIR", tmp_path / "cache")
    calls = []
    real = datasets.load_idx_dir

    def spy(directory, name):
        calls.append(Path(directory))
        return real(directory, name).subset(2, 2)

    monkeypatch.setattr(datasets, "load_idx_dir", spy)
    ds = load_fashion_mnist()
    assert calls == [datasets.DEBIAN_FASHION_MNIST_DIR]
    assert ds.classes == FASHION_MNIST_CLASSES


def test_fashion_mnist_env_var(no_fashion_locations, monkeypatch):
    raw = make_idx_dir(no_fashion_locations / "env", gz=True)
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV_VAR, str(no_fashion_locations / "env"))
    ds = load_fashion_mnist()
    assert ds.X_train.shape == (6, 1, 5, 5)
    np.testing.assert_array_equal(ds.y_train, raw["train_labels"])
    assert ds.classes == FASHION_MNIST_CLASSES


def test_fashion_mnist_root_beats_env(no_fashion_locations, monkeypatch):
    make_idx_dir(no_fashion_locations / "env", n_train=6)
    make_idx_dir(no_fashion_locations / "root", n_train=3)
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV_VAR, str(no_fashion_locations / "env"))
    assert load_fashion_mnist(root=no_fashion_locations / "root").X_train.shape[0] == 3
    # A root without the files falls through to the next location.
    assert load_fashion_mnist(root=no_fashion_locations / "nope").X_train.shape[0] == 6


def test_fashion_mnist_cache_location(no_fashion_locations):
    make_idx_dir(no_fashion_locations / "cache" / "fashion-mnist", n_train=2)
    assert load_fashion_mnist().X_train.shape[0] == 2


def test_fashion_mnist_not_found_message(no_fashion_locations, monkeypatch):
    tmp = no_fashion_locations
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV_VAR, str(tmp / "env-missing"))
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(root=tmp / "root-missing")
    msg = str(info.value)
    for place in ("root-missing", "env-missing", "no-debian", str(tmp / "cache" / "fashion-mnist")):
        assert place in msg
    assert "download=True" in msg
    assert "apt-get install dataset-fashion-mnist" in msg


class _FakeUrlopen:
    """Stands in for urllib.request.urlopen, serving local bytes by file name."""

    def __init__(self, payloads: dict[str, bytes], fail_on: str | None = None):
        self.payloads = payloads
        self.fail_on = fail_on
        self.urls: list[str] = []

    def __call__(self, url, timeout=None):
        self.urls.append(url)
        fname = url.rsplit("/", 1)[-1]
        if fname == self.fail_on:
            raise OSError("simulated network failure")
        return io.BytesIO(self.payloads[fname])


def _fashion_payloads() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    arrays = {
        "train_images": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "train_labels": np.array([0, 1, 2, 9], np.uint8),
        "test_images": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
        "test_labels": np.array([3, 4], np.uint8),
    }
    return {
        IDX_FILES[role] + ".gz": gzip.compress(idx_bytes(arr)) for role, arr in arrays.items()
    }


def test_fashion_mnist_download_uses_cache(no_fashion_locations, monkeypatch):
    fake = _FakeUrlopen(_fashion_payloads())
    monkeypatch.setattr(datasets.urllib.request, "urlopen", fake)
    ds = load_fashion_mnist(download=True)
    assert ds.X_train.shape == (4, 1, 28, 28) and ds.X_test.shape == (2, 1, 28, 28)
    assert ds.y_train.tolist() == [0, 1, 2, 9]
    assert len(fake.urls) == 4
    assert all(u.startswith(datasets.FASHION_MNIST_URL) for u in fake.urls)
    cache = no_fashion_locations / "cache" / "fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(_fashion_payloads())
    # Second call finds the cache and does not download again.
    load_fashion_mnist(download=True)
    assert len(fake.urls) == 4


def test_fashion_mnist_download_failure_leaves_no_partial(no_fashion_locations, monkeypatch):
    fail_on = IDX_FILES["test_images"] + ".gz"
    monkeypatch.setattr(
        datasets.urllib.request, "urlopen", _FakeUrlopen(_fashion_payloads(), fail_on=fail_on)
    )
    with pytest.raises(OSError, match="simulated"):
        load_fashion_mnist(download=True)
    cache = no_fashion_locations / "cache" / "fashion-mnist"
    names = sorted(p.name for p in cache.iterdir())
    assert fail_on not in names
    assert not any(n.endswith(".part") for n in names)


def test_fashion_mnist_download_rejects_non_gzip(no_fashion_locations, monkeypatch):
    payloads = _fashion_payloads()
    payloads[IDX_FILES["train_images"] + ".gz"] = b"<html>not found</html>"
    monkeypatch.setattr(datasets.urllib.request, "urlopen", _FakeUrlopen(payloads))
    with pytest.raises(ValueError, match="not a gzip"):
        load_fashion_mnist(download=True)
    assert not any((no_fashion_locations / "cache" / "fashion-mnist").glob("*train-images*"))


# --------------------------------------------------------------------------------------------
# load_npz
# --------------------------------------------------------------------------------------------
def test_npz_nchw_float(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.random((5, 2, 6, 6)).astype(np.float64)
    path = tmp_path / "set.npz"
    np.savez(path, X_train=X, y_train=np.arange(5), X_test=X[:2], y_test=np.array([1, 0]))
    ds = load_npz(path)
    assert ds.name == "set"
    assert ds.X_train.shape == (5, 2, 6, 6) and ds.X_train.dtype == np.float32
    np.testing.assert_allclose(ds.X_train, X, rtol=1e-6)
    assert ds.y_test.tolist() == [1, 0] and ds.y_train.dtype == np.int64
    assert ds.classes == tuple("01234")


def test_npz_nhw_uint8_scaled(tmp_path):
    X = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3) * 7
    np.savez(tmp_path / "a.npz", x_train=X, y_train=np.array([0, 1, 0, 1]))
    ds = load_npz(tmp_path / "a.npz")
    assert ds.X_train.shape == (4, 1, 3, 3)
    np.testing.assert_allclose(ds.X_train[:, 0], X / 255.0, rtol=1e-6)
    assert ds.X_test.shape == (0, 1, 3, 3) and ds.y_test.shape == (0,)


@pytest.mark.parametrize("channels", [1, 3])
def test_npz_nhwc_transposed(tmp_path, channels):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (4, 7, 5, channels), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", X_train=X, y_train=np.zeros(4, np.int64))
    ds = load_npz(tmp_path / "c.npz")
    assert ds.X_train.shape == (4, channels, 7, 5)
    np.testing.assert_allclose(ds.X_train, np.transpose(X, (0, 3, 1, 2)) / 255.0, rtol=1e-6)


def test_npz_ambiguous_layout_kept_as_nchw(tmp_path):
    X = np.zeros((2, 3, 8, 3), np.uint8)  # second axis looks like channels: keep NCHW
    np.savez(tmp_path / "c.npz", X_train=X, y_train=np.zeros(2, np.int64))
    assert load_npz(tmp_path / "c.npz").X_train.shape == (2, 3, 8, 3)


def test_npz_images_labels_alias_and_classes(tmp_path):
    np.savez(
        tmp_path / "b.npz",
        images=np.zeros((3, 4, 4), np.uint8),
        labels=np.array([[0], [2], [1]]),
        classes=np.array(["cat", "dog", "eel"]),
    )
    ds = load_npz(tmp_path / "b.npz")
    assert ds.X_train.shape == (3, 1, 4, 4) and ds.X_test.shape[0] == 0
    assert ds.y_train.tolist() == [0, 2, 1]
    assert ds.classes == ("cat", "dog", "eel")


def test_npz_float_out_of_range(tmp_path):
    X = np.linspace(-0.5, 2.5, 5 * 16).reshape(5, 4, 4)
    np.savez(tmp_path / "f.npz", X_train=X, y_train=np.zeros(5, np.int64))
    with pytest.raises(ValueError, match=r"min -0\.5.*max 2\.5"):
        load_npz(tmp_path / "f.npz")


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "k.npz", foo=np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="X_train"):
        load_npz(tmp_path / "k.npz")
    np.savez(tmp_path / "n.npz", X_train=np.zeros((3, 4, 4)), y_train=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        load_npz(tmp_path / "n.npz")
    np.savez(tmp_path / "d.npz", X_train=np.zeros((4, 4)), y_train=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="shape"):
        load_npz(tmp_path / "d.npz")
    np.savez(tmp_path / "y.npz", X_train=np.zeros((2, 4, 4)), y_train=np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="integer"):
        load_npz(tmp_path / "y.npz")


def test_npz_refuses_pickled_objects(tmp_path):
    obj = np.empty(2, dtype=object)
    obj[:] = [np.zeros((4, 4)), np.zeros((4, 4))]
    np.savez(tmp_path / "o.npz", X_train=obj, y_train=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npz(tmp_path / "o.npz")


def test_npz_without_the_expected_keys_names_the_file_and_the_keys(tmp_path):
    """Not a KeyError: a ValueError naming the file, the keys it has and those expected."""
    path = tmp_path / "wrong.npz"
    np.savez(path, pixels=np.zeros((2, 4, 4)), targets=np.zeros(2, np.int64))
    with pytest.raises(ValueError) as err:
        load_npz(path)
    assert str(err.value) == (
        f"{path}: expected keys X_train and y_train (or x_train, or images and labels), "
        "optionally X_test and y_test; found ['pixels', 'targets']")
    np.savez(path, X_train=np.zeros((2, 4, 4)), y_train=np.zeros(2, np.int64),
             X_test=np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match=r"wrong.npz: X_test and y_test must be given "
                                         r"together; found \['X_test', 'X_train', 'y_train'\]"):
        load_npz(path)


@pytest.mark.parametrize("content,kind", [
    (b"label,pixel0\n3,0.5\n", "it starts with b'label,'"),
    (None, "a single .npy array"),
    (b"", "it starts with b''"),
])
def test_a_file_that_is_no_npz_archive_is_refused_naming_it(tmp_path, content, kind):
    """A text, .npy or empty file: "PATH is not an .npz archive", never numpy's "contains
    pickled (object) data" without a file name."""
    path = tmp_path / "data.npz"
    if content is None:
        with open(path, "wb") as fh:
            np.save(fh, np.zeros((2, 4, 4)))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_npz(path)
    assert str(err.value) == f"{path} is not an .npz archive (a zip of .npy arrays): {kind}"


def test_a_damaged_npz_archive_is_refused_naming_it(tmp_path):
    path = tmp_path / "cut.npz"
    np.savez_compressed(path, X_train=np.zeros((20, 8, 8)), y_train=np.zeros(20, np.int64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the central directory is gone
    named = re.escape(str(path))
    with pytest.raises(ValueError, match=rf"^{named} is not a readable .npz archive \("):
        load_npz(path)
    damaged = bytearray(data)
    start = data.index(b"X_train.npy") + 60  # inside X_train's compressed bytes
    damaged[start:start + 8] = b"\xff" * 8
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=rf"^{named}: cannot read X_train \("):
        load_npz(path)


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------
def test_digits_shapes_and_range():
    ds = load_digits()
    assert ds.name == "digits"
    assert ds.X_train.shape == (1500, 1, 8, 8) and ds.X_test.shape == (297, 1, 8, 8)
    assert ds.X_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.X_train.min() == 0.0 and ds.X_train.max() == 1.0
    assert ds.classes == tuple(str(k) for k in range(10))
    np.testing.assert_array_equal(np.unique(ds.y_test), np.arange(10))


def test_digits_deterministic_and_shuffled():
    a, b = load_digits(), load_digits()
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    # sklearn's order is 0, 1, 2, ...; the split must not be that order.
    assert a.y_train[:10].tolist() != list(range(10))


# --------------------------------------------------------------------------------------------
# digit_in_noise / with_noise_frame
# --------------------------------------------------------------------------------------------
def _positions(out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corner of the non-zero window in each noise-free frame."""
    nz = out.sum(axis=1) != 0
    rows = np.argmax(nz.any(axis=2), axis=1)
    cols = np.argmax(nz.any(axis=1), axis=1)
    return rows, cols


def test_digit_in_noise_zero_noise_places_digit():
    rng = np.random.default_rng(5)
    images = (rng.random((20, 2, 5, 4)) * 0.9 + 0.1).astype(np.float32)  # strictly positive
    out = digit_in_noise(images, frame=12, noise_std=0.0, random_state=3)
    assert out.shape == (20, 2, 12, 12) and out.dtype == np.float32
    rows, cols = _positions(out)
    for i in range(20):
        r, c = rows[i], cols[i]
        np.testing.assert_array_equal(out[i, :, r : r + 5, c : c + 4], images[i])
        rest = out[i].copy()
        rest[:, r : r + 5, c : c + 4] = 0
        assert not rest.any()


def test_digit_in_noise_adds_digit_onto_noise():
    images = np.ones((1, 1, 3, 3), np.float32)
    noisy = digit_in_noise(images, frame=9, noise_std=0.5, random_state=11)
    noise = digit_in_noise(np.zeros_like(images), frame=9, noise_std=0.5, random_state=11)
    diff = noisy - noise  # same seed: same position and same noise
    assert np.isclose(diff.sum(), 9.0, atol=1e-4)
    assert set(np.round(np.unique(diff), 4)) == {0.0, 1.0}


def test_digit_in_noise_noise_statistics():
    out = digit_in_noise(np.zeros((200, 1, 2, 2), np.float32), frame=20, noise_std=0.5)
    assert abs(out.mean()) < 0.01
    assert abs(out.std() - 0.5) < 0.01


def test_digit_in_noise_seeds_and_global_rng():
    images = np.ones((50, 1, 3, 3), np.float32)
    # The legacy global RNG is read on purpose: the function must leave it untouched.
    state = np.random.get_state()[1].copy()  # noqa: NPY002
    a = digit_in_noise(images, frame=10, random_state=0)
    b = digit_in_noise(images, frame=10, random_state=0)
    c = digit_in_noise(images, frame=10, noise_std=0.0, random_state=1)
    d = digit_in_noise(images, frame=10, noise_std=0.0, random_state=0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.stack(_positions(c)), np.stack(_positions(d)))
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # noqa: NPY002


def test_digit_in_noise_positions_cover_full_range():
    frame, h, w = 7, 2, 3
    out = digit_in_noise(np.ones((2000, 1, h, w), np.float32), frame, 0.0, random_state=2)
    rows, cols = _positions(out)
    assert rows.min() == 0 and rows.max() == frame - h
    assert cols.min() == 0 and cols.max() == frame - w
    assert len(np.unique(rows)) == frame - h + 1 and len(np.unique(cols)) == frame - w + 1


def test_digit_in_noise_frame_equal_to_image():
    images = np.random.default_rng(0).random((3, 1, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(digit_in_noise(images, 6, 0.0), images)


def test_digit_in_noise_errors():
    with pytest.raises(ValueError, match="larger than"):
        digit_in_noise(np.zeros((2, 1, 8, 8)), frame=7)
    with pytest.raises(ValueError, match="larger than"):
        digit_in_noise(np.zeros((2, 1, 4, 9)), frame=8)
    with pytest.raises(ValueError, match=r"\(n, C, h, w\)"):
        digit_in_noise(np.zeros((2, 8, 8)), frame=10)
    with pytest.raises(ValueError, match="noise_std"):
        digit_in_noise(np.zeros((2, 1, 4, 4)), frame=10, noise_std=-1.0)


def test_with_noise_frame():
    ds = small_dataset(n_train=4, n_test=4)
    same = ImageDataset(ds.X_train, ds.y_train, ds.X_train, ds.y_train, "s", ds.classes)
    noisy = with_noise_frame(same, frame=10, noise_std=0.3, random_state=7)
    assert noisy.name == "s-noise10"
    assert noisy.X_train.shape == (4, 1, 10, 10) and noisy.X_test.shape == (4, 1, 10, 10)
    assert noisy.classes == ds.classes
    np.testing.assert_array_equal(noisy.y_train, ds.y_train)
    np.testing.assert_array_equal(
        noisy.X_train, digit_in_noise(ds.X_train, 10, 0.3, random_state=7)
    )
    np.testing.assert_array_equal(noisy.X_test, digit_in_noise(ds.X_train, 10, 0.3, 8))
    assert not np.array_equal(noisy.X_train, noisy.X_test)


def test_with_noise_frame_frames_a_carried_validation_split_with_its_own_seed():
    ds = small_dataset(n_train=4, n_test=4)
    same = ImageDataset(ds.X_train, ds.y_train, ds.X_train, ds.y_train, "s", ds.classes,
                        X_val=ds.X_train, y_val=ds.y_train)
    noisy = with_noise_frame(same, frame=10, noise_std=0.3, random_state=7)
    np.testing.assert_array_equal(noisy.X_val, digit_in_noise(ds.X_train, 10, 0.3, 9))
    np.testing.assert_array_equal(noisy.y_val, ds.y_train)
    assert with_noise_frame(ds, frame=10).X_val is None


def test_a_carried_validation_split_is_checked_kept_and_given_to_fit():
    ds = small_dataset(n_train=5, n_test=3)
    assert ds.validation() == {} and "val=" not in repr(ds)
    both = ImageDataset(ds.X_train, ds.y_train, ds.X_test, ds.y_test, "v", ds.classes,
                        X_val=ds.X_test.astype(np.float64), y_val=ds.y_test.astype(np.int32))
    assert both.X_val.dtype == np.float32 and both.y_val.dtype == np.int64
    assert set(both.validation()) == {"X_val", "y_val"} and "val=(3, 1" in repr(both)
    assert len(both.subset(2, 1).X_val) == 3
    with pytest.raises(ValueError, match="both X_val and y_val"):
        ImageDataset(ds.X_train, ds.y_train, ds.X_test, ds.y_test, "v", ds.classes,
                     X_val=ds.X_test)
    with pytest.raises(ValueError, match="y_val must have shape"):
        ImageDataset(ds.X_train, ds.y_train, ds.X_test, ds.y_test, "v", ds.classes,
                     X_val=ds.X_test, y_val=ds.y_test[:2])
    with pytest.raises(ValueError, match="train and val images differ"):
        ImageDataset(ds.X_train, ds.y_train, ds.X_test, ds.y_test, "v", ds.classes,
                     X_val=ds.X_test[:, :, :2], y_val=ds.y_test)


def test_with_noise_frame_empty_test_split():
    ds = small_dataset(n_test=0)
    noisy = with_noise_frame(ds, frame=6)
    assert noisy.X_test.shape == (0, 1, 6, 6)


# --------------------------------------------------------------------------------------------
# ImageDataset
# --------------------------------------------------------------------------------------------
def test_subset_takes_prefix():
    ds = small_dataset(5, 3)
    sub = ds.subset(2, 1)
    np.testing.assert_array_equal(sub.X_train, ds.X_train[:2])
    np.testing.assert_array_equal(sub.y_test, ds.y_test[:1])
    assert sub.name == ds.name and sub.classes == ds.classes
    full = ds.subset()
    assert full.X_train.shape[0] == 5 and full.X_test.shape[0] == 3
    assert ds.subset(n_test=0).X_test.shape == (0, 1, 4, 4)


def test_subset_errors():
    ds = small_dataset(5, 3)
    with pytest.raises(ValueError, match=r"n_train=6 .* only 5"):
        ds.subset(n_train=6)
    with pytest.raises(ValueError, match=r"n_test=4 .* only 3"):
        ds.subset(n_test=4)
    with pytest.raises(ValueError, match="n_train must be non-negative"):
        ds.subset(n_train=-1)


def test_image_dataset_validation_and_frozen():
    ds = small_dataset()
    with pytest.raises(ValueError, match="y_train"):
        ImageDataset(ds.X_train, ds.y_train[:2], ds.X_test, ds.y_test, "x", ())
    with pytest.raises(ValueError, match="X_test"):
        ImageDataset(ds.X_train, ds.y_train, ds.X_test[:, 0], ds.y_test, "x", ())
    with pytest.raises(ValueError, match="differ"):
        ImageDataset(ds.X_train, ds.y_train, ds.X_test[:, :, :2], ds.y_test, "x", ())
    with pytest.raises(AttributeError):
        ds.name = "other"  # type: ignore[misc]
    assert ds.image_shape == (1, 4, 4) and ds.n_classes == 3


# --------------------------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------------------------
def test_load_dataset_dispatch(tmp_path, no_fashion_locations):
    assert load_dataset("digits").X_train.shape == (1500, 1, 8, 8)
    make_idx_dir(tmp_path / "mnistlike")
    ds = load_dataset(f"idx:{tmp_path / 'mnistlike'}")
    assert ds.X_train.shape == (6, 1, 5, 5) and ds.name == "mnistlike"
    np.savez(tmp_path / "z.npz", X_train=np.zeros((2, 3, 3)), y_train=np.array([0, 1]))
    assert load_dataset(f"npz:{tmp_path / 'z.npz'}").X_train.shape == (2, 1, 3, 3)
    assert load_dataset(str(tmp_path / "z.npz")).name == "z"
    fm = load_dataset("fashion-mnist", root=tmp_path / "mnistlike")
    assert fm.classes == FASHION_MNIST_CLASSES and fm.name == "fashion-mnist"


def test_load_dataset_unknown_spec():
    with pytest.raises(ValueError) as info:
        load_dataset("cifar")
    msg = str(info.value)
    for form in ("digits", "fashion-mnist", "idx:DIR", "npz:PATH", ".npz"):
        assert form in msg


def test_item_pairs_make_c_squared_classes_side_by_side():
    """Fashion-MNIST pairs (here from the bundled digits, the same function): two items side
    by side, class c a + b, seeded, every class drawn."""
    from ray_convrfm.data.datasets import item_pairs, load_digits

    ds = load_digits()
    pairs = item_pairs(ds, n_train=3000, n_test=50, random_state=4)
    c = len(ds.classes)
    assert pairs.X_train.shape == (3000, 1, 8, 16) and pairs.X_test.shape == (50, 1, 8, 16)
    assert len(pairs.classes) == c * c and pairs.classes[c + 2] == f"{ds.classes[1]} | " \
        f"{ds.classes[2]}"
    assert len(np.unique(pairs.y_train)) == c * c  # 3,000 draws cover all 100 classes
    # each half is an item of its split, with the class the label says
    left = {ds.X_train[i].tobytes(): ds.y_train[i] for i in range(len(ds.X_train))}
    for x, label in zip(pairs.X_train[:20], pairs.y_train[:20], strict=True):
        assert left[np.ascontiguousarray(x[:, :, :8]).tobytes()] == label // c
        assert left[np.ascontiguousarray(x[:, :, 8:]).tobytes()] == label % c
    again = item_pairs(ds, n_train=3000, n_test=50, random_state=4)
    np.testing.assert_array_equal(again.X_train, pairs.X_train)
    assert not np.array_equal(item_pairs(ds, 3000, 50, random_state=5).y_train, pairs.y_train)
    with pytest.raises(ValueError, match="pairs"):
        item_pairs(ds, n_train=-1)


@pytest.mark.parametrize("classes", [4, 10, 37, 1000])
def test_item_tuples_make_any_number_of_classes(classes):
    """t items side by side (the fewest with c^t >= classes), class spelled in base c by
    the items' classes, every label below ``classes``, seeded."""
    from ray_convrfm.data.datasets import item_tuples, load_digits

    ds = load_digits()
    c = len(ds.classes)
    t = 1 if classes <= c else 2 if classes <= c * c else 3
    tuples = item_tuples(ds, classes, n_train=300, n_test=20, random_state=1)
    assert tuples.X_train.shape == (300, 1, 8, 8 * t) and tuples.X_test.shape[0] == 20
    assert len(tuples.classes) == classes
    assert tuples.y_train.max() < classes and tuples.y_test.max() < classes
    if classes <= 37:
        assert len(np.unique(tuples.y_train)) == classes  # 300 draws cover them
    item_class = {ds.X_train[i].tobytes(): ds.y_train[i] for i in range(len(ds.X_train))}
    for x, label in zip(tuples.X_train[:10], tuples.y_train[:10], strict=True):
        spelled = [item_class[np.ascontiguousarray(x[:, :, 8 * j : 8 * j + 8]).tobytes()]
                   for j in range(t)]
        assert sum(int(k) * c ** (t - 1 - j) for j, k in enumerate(spelled)) == label
    np.testing.assert_array_equal(item_tuples(ds, classes, 300, 20, random_state=1).X_train,
                                  tuples.X_train)
    with pytest.raises(ValueError, match="classes"):
        item_tuples(ds, 1, 10, 10)


def test_imagenet_shaped_data_of_any_class_count(debian_fashion):
    """``bench scale``'s data: RGB images of ImageNet's shape from Fashion-MNIST items, one
    item for 10 classes, three side by side for 1,000, every label below the class count."""
    from ray_convrfm.tools.bench import imagenet_shaped

    ten = imagenet_shaped(32, 20, 5, seed=1)
    assert ten.X_train.shape == (20, 3, 32, 32) and len(ten.classes) == 10
    many = imagenet_shaped(224, 12, 4, seed=1, classes=1000)
    assert many.X_train.shape == (12, 3, 224, 224) and many.X_test.shape == (4, 3, 224, 224)
    assert len(many.classes) == 1000 and many.y_train.max() < 1000
    assert many.X_train.dtype == np.float32 and 0 <= many.X_train.min() \
        and many.X_train.max() <= 1
    again = imagenet_shaped(224, 12, 4, seed=1, classes=1000)
    np.testing.assert_array_equal(again.X_train, many.X_train)


def test_digits_noise_is_the_bundled_local_signal_task():
    """``ray-convrfm fit``'s default data: every digit added at a seeded random place onto a
    14 x 14 noise frame, the same on every call."""
    from ray_convrfm.data.datasets import load_dataset, load_digits

    ds, plain = load_dataset("digits-noise"), load_digits()
    assert ds.X_train.shape == (len(plain.X_train), 1, 14, 14) and ds.name == "digits-noise14"
    np.testing.assert_array_equal(ds.y_train, plain.y_train)
    np.testing.assert_array_equal(load_dataset("digits-noise").X_test, ds.X_test)
    assert 0.2 < float(ds.X_train[:, :, :3, :3].std()) < 0.3  # corners: mostly noise
