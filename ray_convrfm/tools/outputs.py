"""Where the command line writes: --out folders or URLs, refusal of an earlier run's results,
the kernel store's default place, and the process's peak memory for the summary."""

from __future__ import annotations

import sys
from pathlib import Path

#: What an earlier ``fit`` leaves in its ``--out`` (a kernel store alone is a run to resume).
RESULTS = ("model", "summary.json", "metrics.parquet")
#: ``cnfa``'s results.
CNFA_RESULTS = ("cnfa.parquet", "summary.json")


class UsageError(ValueError):
    """A command line that cannot run as given: reported in one line, exit status 2."""


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def store_url(args, out: Path) -> str | None:
    """--store, or OUT/kernels.zarr for a fit on workers (so a rerun resumes), 'none': none."""
    if args.store == "none":
        return None
    if args.store or not args.workers:
        return args.store
    remote = getattr(args, "out_url", None)
    return f"{remote.rstrip('/')}/kernels.zarr" if remote else str(out / "kernels.zarr")


def output_dir(args, default: Path) -> Path:
    """Where a command writes: --out, or a local staging folder when --out is a URL
    (``s3://bucket/run``; uploaded by ``upload`` at the end, so cluster jobs keep results)."""
    if args.out and "://" in args.out:
        import tempfile

        args.out_url = args.out
        return Path(tempfile.mkdtemp(prefix="ray-convrfm-out-"))
    out = Path(args.out or default)
    out.mkdir(parents=True, exist_ok=True)
    return out


def refuse_earlier_run(args, out: Path, results: tuple[str, ...] = RESULTS) -> None:
    """A ``UsageError`` when --out (a folder, or the URL the staged ``out`` goes to) already
    holds ``results`` of an earlier run, unless --overwrite; called before any work."""
    url = getattr(args, "out_url", None)
    if url:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        found = [r for r in results if fs.exists(f"{path.rstrip('/')}/{r}")]
    else:
        found = [r for r in results if (out / r).exists()]
    if found and not args.overwrite:
        if url:
            import shutil

            shutil.rmtree(out, ignore_errors=True)  # the (empty) local staging folder
        raise UsageError(
            f"--out {url or out} already holds the results of an earlier run ({', '.join(found)}); "
            "pass --overwrite to replace them, or choose another --out")


def upload(args, out: Path) -> str:
    """Copy the staged outputs to --out's URL (fsspec); returns where the results are."""
    url = getattr(args, "out_url", None)
    if not url:
        return str(out)
    import shutil

    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path, exist_ok=True)
    for f in sorted(out.rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{path.rstrip('/')}/{f.relative_to(out).as_posix()}")
    shutil.rmtree(out, ignore_errors=True)
    return url
