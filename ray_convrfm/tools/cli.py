"""The ``ray-convrfm`` command: ``fit`` a ConvRFM, ``predict`` a data set with a saved one,
measure the ``cnfa`` of a CNN, ``bench``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from ray_convrfm.atomic import transaction, write_file, write_text
from ray_convrfm.kernels.patches import ACTIVATIONS, POOL_MODES
from ray_convrfm.options import ENGINES, SOLVERS
from ray_convrfm.tools.cli_bench import add_bench_parser, cmd_bench
from ray_convrfm.tools.cli_data import (
    add_convert_parser,
    add_disk_arguments,
    cmd_convert,
    disk_fit_data,
)
from ray_convrfm.tools.cli_predict import add_predict_parser, cmd_predict
from ray_convrfm.tools.outputs import (
    CNFA_RESULTS,
    UsageError,
    in_flags,
    output_dir,
    peak_rss_mb,
    refuse_earlier_run,
    store_url,
    upload,
)

log = logging.getLogger("ray_convrfm.tools.cli")



def _word_or_number(words: tuple[str, ...], number: type, expected: str):
    """An argparse type: one of ``words``, or else a ``number`` (int or float)."""
    def parse(text: str):
        if text in words:
            return text
        try:
            return number(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}") from None
    return parse


_agop_classes = _word_or_number(("auto", "all"), int, "auto, all or an integer")
#: ``--patch-basis`` and ``--feature-basis`` values (examples/results_table.py takes them too).
patch_basis_arg = _word_or_number(("auto", "full"), float, "auto, full or a share in (0, 1)")


def _ridges(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--ridges takes comma-separated numbers: {err}") from err


def _parser() -> argparse.ArgumentParser:
    """The command line; every default a flag shares with the Python API is taken from there
    (the estimator's parameters, ``ComputeOptions``, ``ClusterOptions``), never declared again."""
    from ray_convrfm.models.convrfm import ConvRFM
    from ray_convrfm.options import ClusterOptions, ComputeOptions

    est, compute, cluster = ConvRFM().get_params(), ComputeOptions(), ClusterOptions()
    p = argparse.ArgumentParser(prog="ray-convrfm", description=__doc__)
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the Python traceback, not only the message")
    # --debug after the command works too (it then overrides the default above)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", parents=[common],
                       help="fit ConvRFM on a dataset and report accuracy per iteration")
    f.add_argument("--dataset", default="digits-noise",
                   help="digits-noise (default: the bundled digits at random places in a "
                        "14 x 14 noise frame, where learning the patch metric pays) | digits | "
                        "fashion-mnist | idx:DIR | npz:PATH | "
                        "parquet:PATH_OR_URL | hf:PATH_OR_URL (Hugging Face shards) | "
                        "folder:DIR or imagenet:DIR (train/<class>/*.JPEG); on-disk sets are "
                        "read by each Ray worker, its own rows")
    f.add_argument("--data-root", default=None, help="directory holding the dataset files")
    f.add_argument("--download", action="store_true",
                   help="download Fashion-MNIST if it is not found locally")
    f.add_argument("--resize", default=None,
                   help="HxW: on-disk images are resized to this on the workers as they read")
    add_disk_arguments(f, report_split=True)
    f.add_argument("--n-train", type=int, default=None, help="first N training images")
    f.add_argument("--n-test", type=int, default=None, help="first N test images")
    f.add_argument("--noise-frame", type=int, default=None,
                   help="paste each image at a random place in an F x F Gaussian noise frame "
                        "(the local-signal task)")
    f.add_argument("--noise-std", type=float, default=0.5)
    f.add_argument("--depth", type=int, default=None,
                   help="kernel depth (default 3; 2 for images under 10 pixels); with --layers, "
                        "the total number of convolutions (layer l has depth - l)")
    f.add_argument("--patch-size", type=int, default=est["patch_size"])
    f.add_argument("--layers", type=int, default=1,
                   help="ConvRFM layers; more than 1 fits a Deep ConvRFM (docs/math.md section 6)")
    f.add_argument("--width", type=int, default=64, help="filters per Deep ConvRFM layer")
    f.add_argument("--filter-power", type=float, default=None,
                   help="Deep ConvRFM: filter banks W = G M^p (default: DeepConvRFM's)")
    f.add_argument("--pool", type=int, default=1,
                   help="Deep ConvRFM: P x P pooling after each filter bank (1: none); with "
                        "pooling every layer's kernel has --depth")
    f.add_argument("--pool-mode", default="avg", choices=POOL_MODES)
    f.add_argument("--activation", default="none", choices=ACTIVATIONS,
                   help="Deep ConvRFM: what each filter's map goes through before pooling")
    f.add_argument("--feature-basis", type=patch_basis_arg, default=None,
                   help="Deep ConvRFM: --patch-basis of the layers after the first (default: "
                        "the same); a share such as 0.99 keeps max-pooled layers cheap")
    f.add_argument("--normalise", action="store_true",
                   help="Deep ConvRFM: scale each filter so its feature map has unit mean "
                        "square over the training images")
    f.add_argument("--layer-patience", type=int, default=1,
                   help="Deep ConvRFM: stop adding layers after this many that do not beat "
                        "the best on validation and keep the best stack (--layers is the "
                        "most); 0: fit and keep every layer")
    f.add_argument("--padding", action="store_true")
    f.add_argument("--iters", type=int, default=est["iters"],
                   help="the most iterations (kernels fitted); --patience stops earlier")
    f.add_argument("--ridges", type=_ridges, default=est["ridges"])
    f.add_argument("--agop-samples", type=int, default=est["agop_samples"])
    f.add_argument("--agop-power", type=float, default=est["agop_power"])
    f.add_argument("--metric-floor", type=float, default=est["metric_floor"],
                   help="raise M's eigenvalues to at least this share of the largest (0: none)")
    f.add_argument("--agop-classes", type=_agop_classes, default=est["agop_classes"],
                   help="auto (exact up to 64 classes, a 64-column sketch beyond), all, or k "
                        "class combinations for the AGOP")
    f.add_argument("--patch-basis", type=patch_basis_arg, default=est["patch_basis"],
                   help="auto (the patches' exact span), full (all C q q dimensions) or a "
                        "share in (0, 1): the leading directions holding that share of the "
                        "patches' energy (cheaper later layers; an approximation)")
    f.add_argument("--val-fraction", type=float, default=est["val_fraction"])
    f.add_argument("--device", default=compute.device)
    f.add_argument("--dtype", default=None, choices=("float32", "float64"),
                   help="working precision (default: the data's own; images are float32)")
    f.add_argument("--engine", default=compute.engine, choices=ENGINES)
    f.add_argument("--memory-budget-mb", type=int, default=compute.memory_budget_mb)
    f.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch and numba in this process (default: every "
                        "available CPU; numpy's BLAS keeps one); Ray workers use one each")
    f.add_argument("--workers", type=int, default=cluster.workers,
                   help="Ray shard workers (0: compute in this process)")
    f.add_argument("--address", default=None,
                   help="Ray cluster to join (auto, ray://...); default: an embedded local Ray")
    f.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per worker (default: 1 when the Ray cluster has GPUs, else 0)")
    f.add_argument("--placement-timeout", type=float, default=cluster.placement_timeout_s,
                   help="seconds to wait for the cluster to provide the workers (0: forever)")
    f.add_argument("--max-restarts", type=int, default=cluster.max_restarts,
                   help="restarts of each Ray worker (its tasks wait for the restart)")
    f.add_argument("--recovery-timeout", type=float, default=cluster.recovery_timeout_s,
                   help="seconds to wait for a worker lost with its node (a rerun with the "
                        "same --store resumes)")
    f.add_argument("--store", default=None,
                   help="zarr store (path or fsspec URL such as s3://...) for kernel blocks; "
                        "with --workers the default is OUT/kernels.zarr; a rerun computes only "
                        "missing blocks ('none': no store)")
    f.add_argument("--solver", default=est["solver"], choices=SOLVERS,
                   help="exact (n x n Cholesky), nystrom (preconditioned CG over resident "
                        "kernel rows) or nystrom-direct (m x m normal equations)")
    f.add_argument("--patience", type=int, default=est["patience"],
                   help="stop after this many iterations without a better validation score "
                        "(0: run all --iters)")
    f.add_argument("--centers", type=int, default=None,
                   help="Nystrom centers m (default min(n, 2000))")
    f.add_argument("--resident-mb", type=int, default=None,
                   help="--solver nystrom: memory per worker for resident kernel rows; slabs "
                        "beyond it are read back from zarr at every CG step (default: all "
                        "resident)")
    f.add_argument("--preconditioner-rank", type=int, default=None,
                   help="--solver nystrom: a rank-q preconditioner (m x q numbers on one "
                        "worker) instead of the m x m factor")
    f.add_argument("--seed", type=int, default=est["random_state"])
    f.add_argument("--out", default=None,
                   help="output directory or URL (s3://..., uploaded at the end; default "
                        "runs/<dataset>); one holding an earlier run's results is refused "
                        "without --overwrite (a kernel store alone is resumed)")
    f.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out")
    f.add_argument("--quiet", action="store_true", help="no progress bars")

    c = sub.add_parser("cnfa", parents=[common],
                       help="train a small CNN, then measure the CNFA per conv layer")
    c.add_argument("--dataset", default="fashion-mnist",
                   help="fashion-mnist (default) | digits | idx:DIR | npz:PATH")
    c.add_argument("--data-root", default=None)
    c.add_argument("--download", action="store_true")
    c.add_argument("--n-train", type=int, default=10000, help="first N training images")
    c.add_argument("--n-test", type=int, default=2000)
    c.add_argument("--width", type=int, default=64)
    c.add_argument("--conv-layers", type=int, default=4)
    c.add_argument("--epochs", type=int, default=6)
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--lr", type=float, default=3e-3)
    c.add_argument("--cnfa-images", type=int, default=256,
                   help="training images the patch AGOPs are averaged over")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default=None, help="output directory (default runs/cnfa-<dataset>)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out")
    c.add_argument("--quiet", action="store_true")

    add_convert_parser(sub, common)
    add_bench_parser(sub, common)
    add_predict_parser(sub, common)
    return p


def _set_threads(threads: int | None) -> None:
    """This process's thread pools, once (``kernels.threads``; None: every available CPU)."""
    from ray_convrfm.kernels.threads import configure_threads

    configure_threads(threads)


def _format_table(rows: list[dict]) -> str:
    head = f"{'iter':>4} {'ridge':>8} {'val acc':>8} {'test acc':>8} {'train mse':>10} " \
           f"{'kernel s':>9} {'solve s':>8} {'AGOP s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        test = r.get("monitor_acc")
        lines.append(
            f"{r['iter']:>4} {r['ridge']:>8.0e} {100 * r['val_acc']:>7.2f}% "
            f"{'' if test is None else f'{100 * test:.2f}%':>8} {r['train_mse']:>10.3g} "
            f"{r['seconds_kernel']:>9.1f} {r['seconds_solve']:>8.2f} {r['seconds_agop']:>7.1f}"
        )
    return "\n".join(lines)


def cmd_fit(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_convrfm.data.datasets import load_dataset, with_noise_frame
    from ray_convrfm.data.sources import is_disk_spec
    from ray_convrfm.models.convrfm import ConvRFM
    from ray_convrfm.models.deep import DeepConvRFM
    from ray_convrfm.models.rfm import RFMParams
    from ray_convrfm.options import ClusterOptions, Options
    from ray_convrfm.tools.viz import plot_deep_filters, plot_filters, plot_history

    # flags that would have no effect together are refused before any work (main says the
    # API's messages in flags: "--address auto has no effect with --workers 0 ...")
    ClusterOptions(workers=args.workers, address=args.address)
    RFMParams(solver=args.solver, centers=args.centers).refuse_ignored()
    _set_threads(args.threads)
    if is_disk_spec(args.dataset):
        ds = disk_fit_data(args)
    else:
        if args.resize:
            raise UsageError("--resize works with parquet:, hf: and folder: data sets "
                             "(convert with --size)")
        ds = load_dataset(args.dataset, root=args.data_root, download=args.download)
        ds = ds.subset(args.n_train, args.n_test)
        if args.noise_frame:
            ds = with_noise_frame(ds, frame=args.noise_frame, noise_std=args.noise_std,
                                  random_state=args.seed)
    small = min(ds.X_train.shape[2:]) < 10
    depth = args.depth if args.depth is not None else (2 if small else 3)
    iters = args.iters
    out = output_dir(args, Path("runs") / ds.name)
    refuse_earlier_run(args, out)
    options = Options.of(device=args.device, dtype=args.dtype, engine=args.engine,
                         memory_budget_mb=args.memory_budget_mb, threads=args.threads,
                         workers=args.workers,
                         address=args.address, store=store_url(args, out),
                         gpus_per_worker=args.gpus_per_worker,
                         placement_timeout_s=args.placement_timeout or None,
                         max_restarts=args.max_restarts,
                         recovery_timeout_s=args.recovery_timeout,
                         resident_mb=args.resident_mb,
                         preconditioner_rank=args.preconditioner_rank,
                         verbose=not args.quiet)
    layer = ConvRFM(depth=depth, patch_size=args.patch_size, padding=args.padding, iters=iters,
                    ridges=args.ridges, agop_samples=args.agop_samples,
                    agop_power=args.agop_power, metric_floor=args.metric_floor,
                    agop_classes=args.agop_classes, patch_basis=args.patch_basis,
                    val_fraction=args.val_fraction,
                    solver=args.solver, centers=args.centers,
                    patience=args.patience or None,
                    random_state=args.seed,
                    options=options)
    if args.layers > 1:
        # --depth is the total number of convolutions, as for ConvRFM: layer l has depth - l;
        # with pooling, every layer's kernel has depth --depth
        pooled = args.pool > 1
        model = DeepConvRFM(layer, layers=args.layers, width=args.width,
                            total_depth=None if pooled else depth, pool=args.pool,
                            pool_mode=args.pool_mode, normalise=args.normalise,
                            activation=args.activation, feature_basis=args.feature_basis,
                            layer_patience=args.layer_patience or None,
                            **({} if args.filter_power is None
                               else {"filter_power": args.filter_power}))
        depths = [depth] * args.layers if pooled else [depth - i for i in range(args.layers)]
        what = (f"Deep ConvRFM, {args.layers} layers of width {args.width}, kernel depths "
                f"{', '.join(map(str, depths))}"
                + (f", {args.pool_mode} pooling {args.pool} x {args.pool}" if pooled else "")
                + (f", {args.activation} between layers" if args.activation != "none" else ""))
    else:
        model = layer
        what = f"ConvRFM, depth {depth}"
    print(f"{ds.name}: {len(ds.X_train)} train / {len(ds.y_test)} test images of shape "
          f"{ds.X_train.shape[1:]}; {what}, at most {iters} iterations"
          f"{f' (patience {args.patience})' if args.patience else ''} -> {args.out or out}",
          flush=True)
    t0 = time.perf_counter()
    monitor = (ds.X_test, ds.y_test) if len(ds.y_test) else None
    model.fit(ds.X_train, ds.y_train, monitor=monitor, **ds.validation())
    seconds = time.perf_counter() - t0

    layers = model.layers_ if args.layers > 1 else [
        {"history": model.history_, "best_iter": model.best_iter_, "ridge": model.ridge_,
         "M": model.M_, "M_path": model.M_path_, "depth": depth}]
    for i, layer in enumerate(layers):
        if len(layers) > 1:
            print(f"layer {i} (kernel depth {layer['depth']}):")
        print(_format_table(layer["history"]))
    last, first = layers[-1], layers[0]
    test_acc = last["history"][last["best_iter"]].get("monitor_acc")
    fixed = first["history"][0].get("monitor_acc")
    summary = {
        "dataset": ds.name, "n_train": int(len(ds.X_train)), "n_test": int(len(ds.y_test)),
        "model": type(model).__name__, "layers": len(layers), "depth": depth, "iters": iters,
        "layer_val_acc": list(getattr(model, "layer_val_acc_", [])),
        "best_iter": [la["best_iter"] for la in layers], "ridge": [la["ridge"] for la in layers],
        "val_acc": last["history"][last["best_iter"]]["val_acc"], "test_acc": test_acc,
        "fixed_kernel_test_acc": fixed, "fit_seconds": seconds,
        "driver_peak_rss_mb": peak_rss_mb(),
        # seconds per distributed stage (empty in process), e.g. nystrom_rows, cg_step
        "stage_seconds": dict(getattr(getattr(model, "final_", model), "timings_", {})),
    }
    per_worker = [h["worker_peak_rss_mb"] for la in layers for h in la["history"]
                  if h.get("worker_peak_rss_mb")]
    if per_worker:  # each worker's peak over the fit (the first one holds the factor)
        peaks = [max(p) for p in zip(*per_worker, strict=True)]
        summary["worker_peak_rss_mb"] = max(peaks)
        summary["worker_peaks_rss_mb"] = peaks
        print(f"peak memory: driver {summary['driver_peak_rss_mb']:.0f} MiB, workers "
              f"{', '.join(f'{p:.0f}' for p in peaks)} MiB")
    if test_acc is not None:
        print(f"chosen on validation: iteration {last['best_iter']}, ridge {last['ridge']:g}"
              f"{' at the last layer' if len(layers) > 1 else ''}; test accuracy "
              f"{100 * test_acc:.2f}% (fixed kernel {100 * fixed:.2f}%, "
              f"{100 * (test_acc - fixed):+.2f} points)")
    rows = [(i, h, h["iter"] == la["best_iter"]) for i, la in enumerate(layers)
            for h in la["history"]]
    table = pa.table({
        "layer": [i for i, _, _ in rows],
        "iter": [h["iter"] for _, h, _ in rows],
        "ridge": [h["ridge"] for _, h, _ in rows],
        "val_acc": [h["val_acc"] for _, h, _ in rows],
        "test_acc": [h.get("monitor_acc") for _, h, _ in rows],
        "train_mse": [h["train_mse"] for _, h, _ in rows],
        "seconds_kernel": [h["seconds_kernel"] for _, h, _ in rows],
        "seconds_solve": [h["seconds_solve"] for _, h, _ in rows],
        "seconds_agop": [h["seconds_agop"] for _, h, _ in rows],
        "chosen": [c for _, _, c in rows],
    })
    with transaction():  # the model and the run's records: all in place, or none replaced
        model.save(out / "model")
        write_file(out / "metrics.parquet", lambda tmp: pq.write_table(table, str(tmp)))
        write_text(out / "summary.json", json.dumps(summary, indent=2))
    C = ds.X_train.shape[1]
    if len(layers) > 1:
        plot_deep_filters(layers, C, out / "filters.png",
                          title=f"{ds.name}: top eigenvectors of each layer's M, in pixels")
    else:
        best = first["best_iter"]
        metrics = [(f"chosen (iteration {best})", first["M"].numpy())]
        if best == 0 and len(first["M_path"]) > 1:  # validation kept M = I: show what was learned
            last = len(first["M_path"]) - 1
            metrics = [("chosen: M = I (iteration 0)", first["M"].numpy()),
                       (f"last learned (iteration {last})", first["M_path"][-1].numpy())]
        plot_filters(metrics, C, args.patch_size, out / "filters.png",
                     title=f"{ds.name}: top eigenvectors of M, as {args.patch_size} x "
                           f"{args.patch_size} filters (eigenvalue above each)")
    plot_history([la["history"] for la in layers], out / "accuracy.png", title=ds.name,
                 chosen=[la["best_iter"] for la in layers])
    where = upload(args, out)
    print(f"wrote {where}/model, metrics.parquet, summary.json, filters.png, accuracy.png")
    return 0


def cmd_cnfa(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq
    import torch

    from ray_convrfm.cnfa.measure import initial_copy, measure_cnfa, to_table
    from ray_convrfm.cnfa.networks import SmallCNN, accuracy, train_classifier
    from ray_convrfm.data.datasets import load_dataset
    from ray_convrfm.tools.viz import plot_cnfa

    _set_threads(args.threads)
    ds = load_dataset(args.dataset, root=args.data_root, download=args.download)
    ds = ds.subset(min(args.n_train, len(ds.y_train)), min(args.n_test, len(ds.y_test)))
    out = Path(args.out or Path("runs") / f"cnfa-{ds.name}")
    refuse_earlier_run(args, out, CNFA_RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = SmallCNN(ds.X_train.shape[1], ds.n_classes, args.width, args.conv_layers)
    init = initial_copy(model)
    print(f"{ds.name}: training a {args.conv_layers}-layer CNN of width {args.width} on "
          f"{len(ds.y_train)} images for {args.epochs} epochs -> {out}", flush=True)
    history = train_classifier(model, ds.X_train, ds.y_train, epochs=args.epochs,
                               batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               progress=not args.quiet)
    test_acc = accuracy(model, ds.X_test, ds.y_test) if len(ds.y_test) else None
    images = torch.as_tensor(ds.X_train[: args.cnfa_images], dtype=torch.float32)
    rows = measure_cnfa(model, images, initial_model=init)
    head = f"{'layer':<14} {'d':>4} {'stride':>7} {'trained ^1':>10} {'trained ^1/2':>12} " \
           f"{'init ^1':>8} {'init ^1/2':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.layer:<14} {r.d:>4} {str(r.stride):>7} {r.corr_power_1:>10.3f} "
              f"{r.corr_power_half:>12.3f} {r.init_corr_power_1:>8.3f} "
              f"{r.init_corr_power_half:>9.3f}")
    if test_acc is not None:
        print(f"CNN test accuracy {100 * test_acc:.2f}% after {args.epochs} epochs")
    with transaction():
        write_file(out / "cnfa.parquet", lambda tmp: pq.write_table(to_table(rows), str(tmp)))
        write_text(out / "summary.json", json.dumps(
            {"dataset": ds.name, "n_train": int(len(ds.y_train)), "test_acc": test_acc,
             "epochs": history, "cnfa_images": int(len(images)),
             "layers": [r.__dict__ for r in rows]}, indent=2, default=str))
    plot_cnfa(rows, out / "cnfa.png", title=f"CNFA, {ds.name}: W^T W vs patch AGOP")
    print(f"wrote {out}/cnfa.parquet, cnfa.png, summary.json")
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that report a problem with the input, the files or the cluster (bad values,
    missing or existing files, a Ray that cannot be confined), not a bug."""
    errors: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError)
    try:
        from ray_convrfm.backends.embedded_ray import RayConfinementError
    except ImportError:
        return errors
    return (*errors, RayConfinementError)


def _message(exc: BaseException) -> str:
    """The one-line report of ``exc``: a Ray task's error as its cause (without the remote
    traceback Ray adds to it)."""
    cause = getattr(exc, "cause", None)
    if type(exc).__module__.startswith("ray.") and isinstance(cause, BaseException):
        exc = cause
    return str(exc) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns its exit status. An error in the input, the files or the cluster
    is a message on stderr, ``ray-convrfm: error: ...``, and status 2 (as for argparse's
    usage errors), without a traceback; ``--debug`` raises it instead, traceback and all."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    np.set_printoptions(precision=4)
    commands = {"fit": cmd_fit, "cnfa": cmd_cnfa, "bench": cmd_bench, "convert": cmd_convert,
                "predict": cmd_predict}
    try:
        return commands[args.command](args)
    except SystemExit as exc:
        if args.debug or not isinstance(exc.code, str):
            raise
        message = exc.code
    except _user_errors() as exc:
        if args.debug:
            raise
        message = in_flags(_message(exc))
    sys.stdout.flush()
    print(f"ray-convrfm: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
