"""The ImageNet tables of ``docs/scaling.md``: ``tools.costmodel`` applied to n = 1,281,167
images of 3 x 64 x 64 and 3 x 224 x 224 (8-bit pixels), 1,000 classes, on 8, 64 and 512 GPU
workers, with the GPU rates stated in ``ClusterAssumptions`` (assumed: no GPU has run this code
yet), and the memory of each process item by item (``--breakdown``).

    python -m ray_convrfm.tools.imagenet_costs --agop-over-kernel 3.22 [--centers M] [--rank Q]
    python -m ray_convrfm.tools.imagenet_costs --breakdown [--size 224] [--gpus 64] [--rank Q]
"""

from __future__ import annotations

import dataclasses

from ray_convrfm.tools.costmodel import (
    CG,
    GATHER,
    LOAD,
    PER_ITERATION,
    PREDICT,
    WORKER_BASE_BYTES,
    Workload,
    memory,
    memory_breakdown,
    peak_stages,
    storage,
    total,
)
from ray_convrfm.tools.costtime import Rates, predict


@dataclasses.dataclass(frozen=True)
class ClusterAssumptions:
    """What a cloud GPU cluster is assumed to deliver where nothing was measured on one.

    The kernel is element-wise work over (pairs x positions) arrays, bound by memory
    bandwidth on a GPU: at about 30 FLOPs per 8 bytes moved, an H100's 3.35 TB/s bounds it near
    12 TFLOP/s, so 10 TFLOP/s effective is assumed (15 % of the FP32 peak).
    """

    gpu_kernel_flops: float = 10e12
    gpu_gemm_flops: float = 40e12  # FP64 tensor-core GEMM (67 TFLOP/s peak on an H100)
    gpu_factor_flops: float = 10e12  # FP64 Cholesky, triangular solves, QR on the first GPU
    decode_images_per_s: float = 4 * 400  # 4 CPU cores per GPU decoding JPEG 224 or PNG 64
    store_bytes_per_s: float = 200e6  # object-storage writes and reads per worker
    network_bytes_per_s: float = 12.5e9  # 100 Gbit/s between nodes
    worker_start_s: float = 60.0  # warm nodes; an autoscaler starting nodes adds minutes
    reference_classes: int = 10  # the AGOP outputs (classes) the AGOP ratio was measured with
    resident_bytes: int = 40 * 2**30  # resident_mb: half of an 80 GB GPU for K(train, centers)


IMAGENET_TRAIN = 1_281_167
IMAGENET_VAL = 50_000


def imagenet_workload(size: int, gpus: int, assume: ClusterAssumptions = ClusterAssumptions(),
                      m: int = 64_000, classes: int = 1000, val_fraction: float = 0.1,
                      rank: int | None = None, cg_steps: int = 60) -> Workload:
    """One ConvRFM iteration on ImageNet (3 x size x size 8-bit pixels) on ``gpus`` workers;
    the AGOP on the default class sketch (64 outputs beyond 64 classes)."""
    return Workload(n=IMAGENET_TRAIN, m=m, channels=3, height=size, width=size, workers=gpus,
                    iters=1, classes=classes, n_test=IMAGENET_VAL, val_fraction=val_fraction,
                    resident_bytes=assume.resident_bytes, preconditioner_rank=rank,
                    cg_steps=cg_steps)


def imagenet_rows(agop_over_kernel: float, assume: ClusterAssumptions = ClusterAssumptions(),
                  sizes: tuple[int, ...] = (64, 224), gpus: tuple[int, ...] = (8, 64, 512),
                  m: int = 64_000, classes: int = 1000, val_fraction: float = 0.1,
                  rank: int | None = None, cg_steps: int = 60) -> list[dict]:
    """Predicted seconds per stage of one ConvRFM iteration on ImageNet (plus the one-off
    load, centers and prediction), bytes moved per stage, storage and memory per process, for
    every image size and GPU count. Validation holds out the default 10 %: it is scored on the
    workers, so the driver never holds it.

    The AGOP's cost is the AGOP / kernel ratio measured with ``assume.reference_classes``
    outputs, scaled by k / reference_classes, k the AGOP's outputs (64 sketched columns at
    1,000 classes). That proportionality is an ASSUMPTION (pessimistic for k above the
    reference): measured on 100-class Fashion-MNIST pairs, 32 sketched columns made the AGOP
    2.5 x faster than 100 exact ones, less than 100 / 32, because the kernel's adjoint per
    pair does not shrink with the outputs."""
    rows = []
    for size in sizes:
        for w in gpus:
            work = imagenet_workload(size, w, assume, m, classes, val_fraction, rank, cg_steps)
            a = assume
            rates = Rates(work.flops_per_entry() / a.gpu_kernel_flops,
                          agop_over_kernel * work.agop_columns() / a.reference_classes,
                          a.gpu_gemm_flops, a.gpu_factor_flops, a.decode_images_per_s,
                          a.store_bytes_per_s, a.worker_start_s, a.network_bytes_per_s)
            seconds = predict(dataclasses.replace(work, iters=2), rates)
            one = predict(work, rates)
            # one iteration = (two-iteration run) - (one-iteration run), which adds the AGOP
            per_iter = {k: seconds[k] - one[k] for k in seconds
                        if k not in ("total", LOAD, GATHER, PREDICT)}
            st = work.stages()["per_iteration"]
            rows.append({"size": size, "gpus": w, "m": m, "rank": work.rank(),
                         "per_iteration": per_iter, "iteration_s": sum(per_iter.values()),
                         "once_s": {k: one[k] for k in (LOAD, GATHER, PREDICT)},
                         "moved": {k: v["bytes_moved"] for k, v in st.items()},
                         "read_back": st[CG]["bytes_read"], "stored": storage(work),
                         "rows_kept_spilled": work.resident(),
                         "factor": work.factor_memory(), "memory": memory(work),
                         "driver_iteration": WORKER_BASE_BYTES
                         + max(v["driver_memory"] for v in st.values()),
                         "cg_products": work.cg_products()})
    return rows


def _fmt_s(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def _fmt_b(b: float) -> str:  # decimal: GB, TB
    return "0" if not b else f"{b / 1e12:.1f} TB" if b >= 1e12 else \
        f"{b / 1e9:.0f} GB" if b >= 10e9 else f"{b / 1e9:.1f} GB"


def _gib(b: float) -> str:
    return "0" if not b else f"{b / 2**30:,.0f} GiB" if b >= 10 * 2**30 else f"{b / 2**30:.1f} GiB"


def _table(header: list[str], lines: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["---", *["---:"] * (len(header) - 1)]
    return "\n".join(["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
                      *("| " + " | ".join(cells) + " |" for cells in lines)])


def imagenet_table(rows: list[dict]) -> str:
    """Markdown table of ``imagenet_rows``: seconds per stage of one iteration, and once."""
    return _table(["image", "GPUs", "rows of K", "K^T Y", "preconditioner",
                   f"CG ({rows[0]['cg_products']} products)", "validation", "AGOP",
                   "one iteration", "load", "centers to driver", "predict 50k"],
                  [[f"3 x {r['size']} x {r['size']}", str(r["gpus"]),
                    *(_fmt_s(r["per_iteration"][k]) for k in PER_ITERATION),
                    f"**{_fmt_s(r['iteration_s'])}**",
                    *(_fmt_s(r["once_s"][k]) for k in (LOAD, GATHER, PREDICT))]
                   for r in rows])


def imagenet_memory_table(rows: list[dict]) -> str:
    """Markdown table of ``imagenet_rows``: peak memory per process (GiB), rows of K(train,
    centers) per worker, and bytes moved, read back and stored per iteration (GB, TB)."""
    return _table(["image", "GPUs", "worker", "first worker (factor steady / peak)",
                   "driver: iterations / end", "rows kept / spilled per worker", "moved: rows",
                   "K^T Y", "preconditioner", "CG", "validation", "AGOP", "read back",
                   "stored"],
                  [[f"3 x {r['size']} x {r['size']}", str(r["gpus"]),
                    _gib(r["memory"]["worker"]),
                    f"{_gib(r['memory']['first_worker'])} ({_gib(r['factor'][0])} / "
                    f"{_gib(r['factor'][1])})",
                    f"{_gib(r['driver_iteration'])} / {_gib(r['memory']['driver'])}",
                    " / ".join(map(_gib, r["rows_kept_spilled"])),
                    *(_fmt_b(r["moved"][k]) for k in PER_ITERATION), _fmt_b(r["read_back"]),
                    _fmt_b(r["stored"])] for r in rows])


def _size(b: float) -> str:  # binary: KiB, MiB, GiB
    return f"{b / 2**30:,.2f} GiB" if b >= 2**30 else f"{b / 2**20:,.1f} MiB" \
        if b >= 2**20 else f"{b / 2**10:,.0f} KiB"


def breakdown_table(work: Workload) -> str:
    """Markdown table of ``costmodel.memory_breakdown``: for a worker, the first worker and the
    driver (at its peak, and at its largest stage of an iteration), what each holds at that
    stage (every stage with the same peak named), the bytes, the code that allocates or holds
    it, and the peak."""
    st = {**work.stages()["per_iteration"], **work.stages()["once"]}
    at, sections = peak_stages(work), memory_breakdown(work)
    key = "driver_memory"
    at["driver, iterations"] = max(PER_ITERATION, key=lambda s: st[s][key])
    sections["driver, iterations"] = [sections["driver"][0], *st[at["driver, iterations"]][
        "driver_items"]]
    lines = []
    for process, items in sections.items():
        field = f"{process.split(',')[0]}_memory"
        peak = st[at[process]][field]
        stages = " and ".join(s for s in (PER_ITERATION if "," in process else st)
                              if st[s][field] == peak)
        lines.append([f"**{process.replace('_', ' ')}**: {stages}", "", "", ""])
        lines += [["", what, _size(b), f"`{code}`"] for what, b, code in items]
        lines.append(["", "**peak**", f"**{_size(total(items))}**", ""])
    return _table(["process, stage", "holds", "bytes", "allocated or held by"], lines,
                  ["---", "---", "---:", "---"])


def main(argv: list[str] | None = None) -> int:
    """``python -m ray_convrfm.tools.imagenet_costs [scale.json] [--agop-over-kernel R]``: the
    ImageNet tables (seconds; memory and bytes) from the AGOP / kernel ratio measured by
    ``ray-convrfm bench scale`` (its JSON, or the ratio given) and the stated GPU assumptions."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m ray_convrfm.tools.imagenet_costs",
                                description=main.__doc__)
    p.add_argument("scale_json", nargs="?", help="scale.json of `ray-convrfm bench scale`")
    p.add_argument("--agop-over-kernel", type=float, default=None,
                   help="the AGOP / kernel cost ratio at 10 outputs (instead of the JSON's)")
    p.add_argument("--gpu-kernel-tflops", type=float, default=10.0)
    p.add_argument("--centers", type=int, default=64_000)
    p.add_argument("--rank", type=int, default=None,
                   help="a rank-q preconditioner (default: Falkon's m x m factor)")
    p.add_argument("--resident-gib", type=float, default=40.0,
                   help="resident rows of K(train, centers) per worker (resident_mb)")
    p.add_argument("--cg-steps", type=int, default=60, help="CG steps per ridge (assumed)")
    p.add_argument("--breakdown", action="store_true",
                   help="print the memory of each process item by item (--size, --gpus)")
    p.add_argument("--size", type=int, default=224, help="image size of --breakdown")
    p.add_argument("--gpus", type=int, default=64, help="GPU workers of --breakdown")
    args = p.parse_args(argv)
    assume = ClusterAssumptions(gpu_kernel_flops=args.gpu_kernel_tflops * 1e12,
                                resident_bytes=int(args.resident_gib * 2**30))
    if args.breakdown:  # memory only: no rates needed
        print(breakdown_table(imagenet_workload(args.size, args.gpus, assume, args.centers,
                                                rank=args.rank, cg_steps=args.cg_steps)))
        return 0
    ratio = args.agop_over_kernel
    if ratio is None:
        if args.scale_json is None:
            p.error("give scale.json or --agop-over-kernel")
        with open(args.scale_json) as f:
            ratio = Rates.from_dict(json.load(f)["rates"]).agop_over_kernel
    rows = imagenet_rows(ratio, assume, m=args.centers, rank=args.rank,
                         cg_steps=args.cg_steps)
    print(imagenet_table(rows) + "\n\n" + imagenet_memory_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
