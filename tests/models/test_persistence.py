"""Saved models are not trusted: every file edited on disk is refused with a ValueError that
names the file, never loaded into a wrong predictor, never a KeyError or a library trace."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ray_convrfm import ConvRFM, DeepConvRFM
from ray_convrfm.data.datasets import load_digits
from ray_convrfm.models.persistence import FORMAT_VERSION, ModelFileError


@pytest.fixture(scope="module")
def digits():
    ds = load_digits()
    return ds.X_train[:120], ds.y_train[:120], ds.X_test[:30]


@pytest.fixture(scope="module")
def fitted(digits):
    X, y, _ = digits
    return ConvRFM(depth=2, iters=2, agop_samples=20, random_state=0).fit(X, y)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, fitted) -> Path:
    return fitted.save(tmp_path_factory.mktemp("saved") / "model")


@pytest.fixture
def model_dir(tmp_path, saved) -> Path:
    """A fresh copy of the saved model for each test to edit."""
    return Path(shutil.copytree(saved, tmp_path / "model"))


def edit_config(path: Path, change) -> None:
    cfg = json.loads((path / "config.json").read_text())
    change(cfg)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def edit_tensors(path: Path, change) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


def refused(path: Path, file: str, match: str, cls=ConvRFM) -> ModelFileError:
    """Loading raises a ValueError (ModelFileError) naming ``path / file`` and ``match``."""
    with pytest.raises(ValueError, match=match) as info:
        cls.load(path)
    assert isinstance(info.value, ModelFileError)
    assert str(path / file) in str(info.value)
    return info.value


# ------------------------------------------------------------------------------ round trip
def test_saved_model_records_format_3_and_a_digest_and_loads(digits, fitted, model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["format_version"] == FORMAT_VERSION == 9
    assert cfg["digest"].startswith("sha256:") and len(cfg["digest"]) == 7 + 64
    assert not {"options", "workers", "address"} & set(cfg["params"])
    # reformatting the JSON is no edit: the digest is over its content
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=None, sort_keys=True))
    loaded = ConvRFM.load(model_dir)
    np.testing.assert_allclose(loaded.decision_function(digits[2]),
                               fitted.decision_function(digits[2]))


def test_older_format_is_refused(model_dir):
    edit_config(model_dir, lambda c: c.update(format_version=2))
    with pytest.raises(ValueError, match="format version 2"):
        ConvRFM.load(model_dir)


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize("where", ["params", "top"])
def test_cluster_settings_in_a_config_are_refused_naming_the_keys(model_dir, where):
    extra = {"workers": 1, "address": "10.255.255.1:6379"}

    def change(cfg):
        (cfg["params"] if where == "params" else cfg).update(extra)

    edit_config(model_dir, change)
    err = refused(model_dir, "config.json", "unknown keys")
    assert "'address'" in str(err) and "'workers'" in str(err)


# ------------------------------------------------------------------------------ digest
@pytest.mark.parametrize("change", [
    lambda c: c["params"].update(depth=3),  # 8x8 digits fit depth 3: only the digest sees it
    lambda c: c.update(kernel_scale=c["kernel_scale"] * 2),
    lambda c: c.update(classes=c["classes"][::-1]),
    lambda c: c["history"][0].update(val_acc=1.0),
    lambda c: c.update(digest="sha256:" + "0" * 64),
    lambda c: c.update(digest="sha256:" + "\u00e9" * 64),
], ids=["depth", "kernel_scale", "classes", "history", "digest", "non-ascii-digest"])
def test_an_edited_config_is_refused_by_the_digest(model_dir, change):
    edit_config(model_dir, change)
    with pytest.raises(ModelFileError, match="does not match the digest") as info:
        ConvRFM.load(model_dir)
    assert str(model_dir) in str(info.value)


@pytest.mark.parametrize("name", ["alpha", "M", "X_fit", "M_path.0"])
def test_an_edited_tensor_is_refused_by_the_digest(model_dir, name):
    def change(t):
        if name.startswith("M"):  # still a symmetric PSD metric: only the digest sees it
            t[name] = t[name] * 1.5
        else:
            t[name] = t[name].clone()
            t[name].view(-1)[0] += 0.25

    edit_tensors(model_dir, change)
    with pytest.raises(ModelFileError, match="does not match the digest"):
        ConvRFM.load(model_dir)


def test_a_forged_digest_still_meets_the_value_checks(model_dir):
    """A recomputed digest passes, but the values are still checked (defence in depth)."""
    from ray_convrfm.models.persistence import model_digest

    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["kernel_scale"] = 0.0
    del cfg["digest"]
    cfg["digest"] = model_digest(cfg, load_file(str(model_dir / "model.safetensors")))
    (model_dir / "config.json").write_text(json.dumps(cfg))
    refused(model_dir, "config.json", "kernel_scale must be > 0")


# ------------------------------------------------------------------------------ values
@pytest.mark.parametrize("key,value,match", [
    ("kernel_scale", 0.0, "kernel_scale must be > 0"),
    ("kernel_scale", -1.0, "kernel_scale must be > 0"),
    ("kernel_scale", float("nan"), "kernel_scale must be a finite number"),
    ("ridge", float("inf"), "ridge must be a finite number"),
    ("ridge", -1e-3, "ridge must be >= 0"),
    ("best_iter", 2, r"best_iter must be in \[0, 1\]"),
    ("best_iter", -1, r"best_iter must be in \[0, 1\]"),
    ("classes", [], "at least 2 labels"),
    ("classes", [0, 0, 1, 2, 3, 4, 5, 6, 7, 8], "repeated"),
    ("classes_dtype", "object", "classes_dtype"),
    ("image_shape", [1, 9, 9], r"tensor X_fit has shape \(\d+, 1, 8, 8\); the config says "
                               r"\(\*, 1, 9, 9\)"),
    ("image_shape", [2, 8, 8], r"tensor M has shape \(9, 9\); the config says \(18, 18\)"),
    ("history", [], "history must be a list of 1 to 2"),
    ("center_indices", [0, 1], "center_indices must be given for the Nystrom solvers only"),
])
def test_bad_config_values_are_refused(model_dir, key, value, match):
    edit_config(model_dir, lambda c: c.update({key: value}))
    file = "model.safetensors" if "tensor" in match else "config.json"
    refused(model_dir, file, match)


def test_a_digest_of_another_form_is_refused(model_dir):
    edit_config(model_dir, lambda c: c.update(digest=5))
    refused(model_dir, "config.json", "no 'digest' of the form 'sha256:<hex>'")


@pytest.mark.parametrize("key", ["params", "kernel_scale", "classes", "history", "digest"])
def test_missing_keys_are_refused_not_a_key_error(model_dir, key):
    edit_config(model_dir, lambda c: c.pop(key))
    refused(model_dir, "config.json", rf"lacks \['{key}'\]")


def test_missing_params_are_refused(model_dir):
    edit_config(model_dir, lambda c: c["params"].pop("depth"))
    refused(model_dir, "config.json", r"params lacks \['depth'\]")


@pytest.mark.parametrize("value,match", [
    (0, "depth must be a positive integer"), ("2", "depth must be a positive integer"),
    (9, "depth 9 with patch_size 3 needs images"),
])
def test_bad_params_are_refused(model_dir, value, match):
    edit_config(model_dir, lambda c: c["params"].update(depth=value))
    refused(model_dir, "config.json", match)


@pytest.mark.parametrize("change,match", [
    (lambda t: t.update(M=torch.full_like(t["M"], float("nan"))), "tensor M has 81 NaN"),
    (lambda t: t.update(M=-t["M"]), "M must be positive semi-definite: its smallest eigen"),
    (lambda t: t.update(M=t["M"] + torch.triu(torch.ones_like(t["M"]), 1)),
     "M must be symmetric"),
    (lambda t: t.update(M=torch.zeros_like(t["M"])), "tensor M is zero"),
    (lambda t: t.update(M=torch.eye(4)), r"tensor M has shape \(4, 4\); the config says \(9, 9\)"),
    (lambda t: t.update(alpha=t["alpha"][:, :3]), r"tensor alpha has shape \(\d+, 3\)"),
    (lambda t: t.update(alpha=t["alpha"][:-1]), "tensor alpha has shape"),
    (lambda t: t["alpha"].view(-1).__setitem__(3, float("inf")), "tensor alpha has 1 NaN or inf"),
    (lambda t: t.update(X_fit=t["X_fit"][:, :, :7]), "tensor X_fit has shape"),
    (lambda t: t.update(X_fit=t["X_fit"].to(torch.int32)), "X_fit must be float32 or float64"),
    (lambda t: t.pop("M_path.1"), r"lacks tensors \['M_path.1'\]"),
    (lambda t: t.update({"M_path.2": t["M"].clone()}), r"unexpected tensors \['M_path.2'\]"),
    (lambda t: t.update({"M_path.1": -t["M_path.1"]}), "M_path.1 must be positive semi"),
    (lambda t: t.update(patch_basis=torch.ones(9, 2)), "patch_basis .* orthonormal"),
    (lambda t: t.update(patch_basis=torch.eye(9)[:4]), r"patch_basis has shape \(4, 9\)"),
], ids=["nan-M", "negative-M", "asymmetric-M", "zero-M", "shape-M", "alpha-classes",
        "alpha-rows", "inf-alpha", "X_fit-shape", "X_fit-dtype", "missing-M_path",
        "extra-M_path", "negative-M_path", "patch_basis-orthonormal", "patch_basis-shape"])
def test_bad_tensors_are_refused(model_dir, change, match):
    edit_tensors(model_dir, change)
    refused(model_dir, "model.safetensors", match)


# ------------------------------------------------------------------------------ unreadable
@pytest.mark.parametrize("text", ["{\"format_version\": 3, ", "", "\xff\xfe", "[1, 2]",
                                  "{" * 100000])
def test_unreadable_config_is_a_value_error_naming_it(model_dir, text):
    if text == "\xff\xfe":
        (model_dir / "config.json").write_bytes(b"\xff\xfe\x00{")
    else:
        (model_dir / "config.json").write_text(text)
    refused(model_dir, "config.json", "not valid JSON|expected a JSON object")


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "foreign"])
def test_damaged_or_foreign_tensor_file_is_a_value_error_naming_it(model_dir, damage):
    file = model_dir / "model.safetensors"
    data = file.read_bytes()
    if damage == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        file.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif damage == "empty":
        file.write_bytes(b"")
    else:
        save_file({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, str(file))
    match = "lacks tensors" if damage == "foreign" else "not a readable safetensors file"
    refused(model_dir, "model.safetensors", match)


def test_missing_files_are_file_not_found(model_dir, tmp_path):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="not a saved model"):
        ConvRFM.load(model_dir)
    with pytest.raises(FileNotFoundError, match="not a saved model"):
        ConvRFM.load(tmp_path / "nowhere")


def test_nystrom_center_indices_are_checked(digits, tmp_path):
    X, y, _ = digits
    m = ConvRFM(depth=2, iters=1, solver="nystrom", centers=30).fit(X, y)
    path = m.save(tmp_path / "nys")
    edit_config(path, lambda c: c.update(center_indices=c["center_indices"][:-1]))
    refused(path, "config.json", "center_indices must be 30 distinct row numbers")
    m.save(path)
    edit_config(path, lambda c: c.update(center_indices=[0] * 30))
    refused(path, "config.json", "center_indices must be 30 distinct")


# ------------------------------------------------------------------------------ DeepConvRFM
@pytest.fixture(scope="module")
def deep_saved(tmp_path_factory, digits):
    X, y, _ = digits
    pad = lambda A: np.pad(A, ((0, 0), (0, 0), (2, 2), (2, 2)))  # noqa: E731
    deep = DeepConvRFM(ConvRFM(iters=2, agop_samples=20, random_state=1), layers=2,
                       width=4, layer_patience=None).fit(pad(X), y)
    root = tmp_path_factory.mktemp("deep")
    other = DeepConvRFM(ConvRFM(iters=1, agop_samples=20, random_state=2), layers=2,
                        width=4, layer_patience=None).fit(pad(X), y)
    return deep, deep.save(root / "deep"), other.save(root / "other"), pad(digits[2])


@pytest.fixture
def deep_dir(tmp_path, deep_saved) -> Path:
    return Path(shutil.copytree(deep_saved[1], tmp_path / "deep"))


def test_deep_round_trip(deep_saved, deep_dir):
    deep, _, _, Xt = deep_saved
    loaded = DeepConvRFM.load(deep_dir)
    np.testing.assert_allclose(loaded.decision_function(Xt), deep.decision_function(Xt))


def test_deep_cluster_settings_are_refused_naming_the_keys(deep_dir):
    edit_config(deep_dir, lambda c: c["params"]["estimator"].update(workers=2,
                                                                   address="10.0.0.1:6379"))
    err = refused(deep_dir, "config.json", "params.estimator has unknown keys", DeepConvRFM)
    assert "'address'" in str(err) and "'workers'" in str(err)


@pytest.mark.parametrize("change,match", [
    (lambda c: c["layers"][0].update(ridge=0.5), "does not match the digest"),
    (lambda c: c["params"].update(total_depth=5), r"layers\[0\].depth is 4; params give 5"),
    (lambda c: c["layers"][0].update(depth=2), r"layers\[0\].depth is 2; params give 4"),
    # a shorter stack is one kept on validation: its tensors must then be that stack's
    (lambda c: c.update(layers=c["layers"][:1]), "has unexpected tensors"),
    (lambda c: c.update(layer_val_acc=[0.5]), "layers must be a list of 1 to 1 records"),
    (lambda c: c.update(layer_val_acc=[0.5, 0.5, 0.5]), "layer_val_acc must list 1 to 2"),
    (lambda c: c["params"]["estimator"].update(patch_size=0), "patch_size must be a positive"),
    (lambda c: c["params"].update(width=5), r"layer0.filters has shape \(4, 1, 3, 3\); the "
                                            r"config says \(5, 1, 3, 3\)"),
    (lambda c: c.pop("final_digest"), r"lacks \['final_digest'\]"),
], ids=["ridge", "total_depth", "layer-depth", "layers", "layer_val_acc-short",
        "layer_val_acc-long", "estimator-patch_size", "width", "final_digest"])
def test_deep_config_edits_are_refused(deep_dir, change, match):
    edit_config(deep_dir, change)
    file = "model.safetensors" if "filters" in match or "tensors" in match else "config.json"
    refused(deep_dir, file, match, DeepConvRFM)


CONFIG, TENSORS = "config.json", "model.safetensors"


@pytest.mark.parametrize("change,file,match", [
    (lambda t: t["layer0.filters"].view(-1).__setitem__(0, float("nan")), TENSORS,
     "layer0.filters has 1 NaN"),
    (lambda t: t.update({"layer0.filters": t["layer0.filters"][:2]}), TENSORS,
     r"layer0.filters has shape \(2, 1, 3, 3\); the config says \(4, 1, 3, 3\)"),
    (lambda t: t.update({"layer1.M": -t["layer1.M"]}), TENSORS,
     "layer1.M must be positive semi-def"),
    (lambda t: t.pop("layer0.filters"), TENSORS, r"lacks tensors \['layer0.filters'\]"),
    (lambda t: t.update({"layer0.M": t["layer0.M"] * 2}), CONFIG, "does not match the digest"),
    (lambda t: t.update({"layer1.M": t["layer1.M"] * 2}), CONFIG,
     r"final does not match .*config.json: its M \(layer1.M differs\)"),
], ids=["nan-filters", "filters-shape", "negative-M", "missing-filters", "scaled-M",
        "last-M"])
def test_deep_tensor_edits_are_refused(deep_dir, change, file, match):
    edit_tensors(deep_dir, change)
    refused(deep_dir, file, match, DeepConvRFM)


def test_deep_final_model_is_checked_and_bound_to_its_config(deep_saved, deep_dir):
    # the final model's own files are checked as ConvRFM.load checks them
    edit_config(deep_dir / "final", lambda c: c.update(kernel_scale=c["kernel_scale"] * 3))
    refused(deep_dir / "final", "config.json", "does not match the digest", ConvRFM)
    with pytest.raises(ModelFileError, match="does not match the digest"):
        DeepConvRFM.load(deep_dir)
    # a valid final model of another fit is refused: it is not the one saved with this config
    shutil.rmtree(deep_dir / "final")
    shutil.copytree(deep_saved[2] / "final", deep_dir / "final")
    with pytest.raises(ModelFileError, match="is not the final model saved with") as info:
        DeepConvRFM.load(deep_dir)
    assert str(deep_dir / "final") in str(info.value)
    shutil.rmtree(deep_dir / "final")
    with pytest.raises(FileNotFoundError, match="not a saved model"):
        DeepConvRFM.load(deep_dir)


def test_a_model_fitted_on_8_bit_pixels_keeps_them_and_round_trips(tmp_path):
    """Centers rest as stored: a fit on uint8 images keeps uint8 X_fit_ (a quarter of the
    bytes), predicts as the fit on the same pixels / 255, and saves and loads as such."""
    from ray_convrfm import ConvRFM
    from ray_convrfm.data.datasets import load_digits

    ds = load_digits()
    U = np.rint(ds.X_train[:150] * 255).astype(np.uint8)
    F = U.astype(np.float32) / np.float32(255)
    Ut = np.rint(ds.X_test[:30] * 255).astype(np.uint8)
    kw = dict(depth=2, iters=2, agop_samples=20, random_state=1, solver="nystrom", centers=40)
    pixels, floats = ConvRFM(**kw).fit(U, ds.y_train[:150]), ConvRFM(**kw).fit(F, ds.y_train[:150])
    assert pixels.X_fit_.dtype == torch.uint8 and floats.X_fit_.dtype == torch.float32
    np.testing.assert_array_equal(pixels.decision_function(Ut),
                                  floats.decision_function(Ut.astype(np.float32) / 255))
    loaded = ConvRFM.load(pixels.save(tmp_path / "m"))
    assert loaded.X_fit_.dtype == torch.uint8
    np.testing.assert_allclose(loaded.decision_function(Ut), pixels.decision_function(Ut),
                               rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------ atomic writes
def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (temporary ones included) by relative path, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()} if root.exists() else {}


_SAVE_UNDER_A_FILE_SIZE_LIMIT = """
import json, resource, signal, sys
from ray_convrfm import ConvRFM
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
model = ConvRFM.load(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))
try:
    model.save(sys.argv[2])
except Exception as err:
    print(json.dumps([type(err).__name__, str(err)]))
"""


def test_a_file_size_limit_while_saving_leaves_the_previous_model_or_nothing(saved, fitted,
                                                                           digits, tmp_path):
    """A real failed write (RLIMIT_FSIZE in a child): an OSError naming model.safetensors,
    and the folder holds what it held before, byte for byte, or does not exist."""
    import subprocess
    import sys

    limit = (saved / "model.safetensors").stat().st_size // 2
    assert limit > (saved / "config.json").stat().st_size  # the tensors are what fails
    other = ConvRFM(depth=2, iters=1, agop_samples=20, random_state=5).fit(*digits[:2])
    for target, before in ((tmp_path / "fresh" / "model", None),
                           (tmp_path / "earlier", other.save(tmp_path / "earlier"))):
        held = files(target)
        run = subprocess.run([sys.executable, "-c", _SAVE_UNDER_A_FILE_SIZE_LIMIT, str(saved),
                              str(target), str(limit)], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout) == [
            "OSError", f"[Errno 27] File too large: '{target / 'model.safetensors'}'"]
        assert files(target) == held  # no 0-byte, partial or temporary file
        if before is None:
            assert not (tmp_path / "fresh").exists()
        else:
            np.testing.assert_array_equal(ConvRFM.load(target).predict(digits[2]),
                                          other.predict(digits[2]))


def _failing_writes(monkeypatch, fail_at: int) -> None:
    """``Path.write_text`` (the configs' writer) writes half its text and then fails with a
    full disk at call ``fail_at`` (1: the first)."""
    import errno

    real, calls = Path.write_text, []

    def write_text(self, text, *args, **kwargs):
        calls.append(self)
        if len(calls) < fail_at:
            return real(self, text, *args, **kwargs)
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text)


def test_a_full_disk_while_writing_the_config_leaves_no_0_byte_config(fitted, digits, tmp_path,
                                                                      monkeypatch):
    """The config's write fails half-way: the OSError names config.json; an earlier model in
    the folder is kept whole (tensors included), a new folder is not left behind."""
    earlier = ConvRFM(depth=2, iters=1, agop_samples=20, random_state=5).fit(*digits[:2])
    earlier.save(tmp_path / "earlier")
    for target in (tmp_path / "earlier", tmp_path / "new" / "model"):
        held = files(target)
        with monkeypatch.context() as m:
            _failing_writes(m, 1)
            with pytest.raises(OSError) as err:
                fitted.save(target)
        assert str(err.value) == f"[Errno 28] No space left on device: '{target / 'config.json'}'"
        assert files(target) == held
    assert not (tmp_path / "new").exists()
    np.testing.assert_array_equal(ConvRFM.load(tmp_path / "earlier").predict(digits[2]),
                                  earlier.predict(digits[2]))


def test_a_failed_deep_save_keeps_the_previous_final_model_too(deep_saved, tmp_path,
                                                               monkeypatch):
    """final/ is written first; when the top config then fails, final/ is not replaced either
    (its digest is recorded in the top config: a new final/ would not load with the old)."""
    deep, path, other, Xt = deep_saved
    target = Path(shutil.copytree(other, tmp_path / "deep"))
    held = files(target)
    with monkeypatch.context() as m:
        _failing_writes(m, 2)  # final/config.json is written, then config.json fails
        with pytest.raises(OSError, match=r"No space left on device: '.*deep/config.json'"):
            deep.save(target)
    assert files(target) == held
    fresh = tmp_path / "fresh"
    with monkeypatch.context() as m:
        _failing_writes(m, 2)
        with pytest.raises(OSError, match="fresh/config.json"):
            deep.save(fresh)
    assert not fresh.exists()
    deep.save(target)  # and without a failure the new model replaces the old one whole
    np.testing.assert_allclose(DeepConvRFM.load(target).decision_function(Xt),
                               deep.decision_function(Xt))
    assert sorted(files(target)) == ["config.json", "final/config.json",
                                     "final/model.safetensors", "model.safetensors"]
