"""Where the command line writes: --out folders or URLs, refusal of an earlier run's results,
the kernel store's default place, the process's peak memory for the summary, and the Python
API's messages said in flags."""

from __future__ import annotations

import re
import sys
from pathlib import Path

#: What an earlier ``fit`` leaves in its ``--out`` (a kernel store alone is a run to resume).
RESULTS = ("model", "summary.json", "metrics.parquet")
#: ``cnfa``'s results.
CNFA_RESULTS = ("cnfa.parquet", "summary.json")


class UsageError(ValueError):
    """A command line that cannot run as given: reported in one line, exit status 2."""


#: The Python API's keyword names (in its messages) and the command line's flags for them.
KEYWORD_FLAGS = {"address": "--address", "centers": "--centers", "download": "--download",
                 "follow_symlinks": "--follow-symlinks", "gpus_per_worker": "--gpus-per-worker",
                 "overwrite": "--overwrite", "placement_timeout_s": "--placement-timeout",
                 "size": "--resize", "solver": "--solver", "store": "--store",
                 "workers": "--workers"}
_NOT_AFTER = r"(?<![\w.`'\"/=-])(?<!\w\()"  # not in a path, a quote or a call f(name=...)
_KEYWORD_VALUE = re.compile(_NOT_AFTER + "(" + "|".join(KEYWORD_FLAGS)
                            + r")=('[^']*'|\([^)]*\)|\.\.\.|[^\s,;)]*[^\s,;).])")
_BARE_KEYWORD = re.compile(_NOT_AFTER + "(" + "|".join(k for k in KEYWORD_FLAGS if "_" in k)
                           + r")(?![\w=])")


def in_flags(message: str) -> str:
    """An API message as the command line says it, for the names in ``KEYWORD_FLAGS``:
    ``overwrite=True`` is ``--overwrite``, ``address=None`` ``no --address``, ``workers=2``
    ``--workers 2`` (quotes dropped, ``size=(H, W)`` as ``--resize HxW``); names with an
    underscore are translated alone too (``gpus_per_worker`` is ``--gpus-per-worker``)."""
    def keyword_value(m: re.Match) -> str:
        flag, value = KEYWORD_FLAGS[m[1]], m[2]
        if value in ("True", "None"):
            return flag if value == "True" else f"no {flag}"
        if value.startswith("("):
            value = "x".join(v.strip() for v in value[1:-1].split(","))
        return f"{flag} {value.strip(chr(39))}"

    message = _KEYWORD_VALUE.sub(keyword_value, message)
    return _BARE_KEYWORD.sub(lambda m: KEYWORD_FLAGS[m[1]], message)


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
