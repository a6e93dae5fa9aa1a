"""How the Triton engine cuts a kernel block into launches (``triton_engine``): position
tiles sized from the device's L2 per SM, rows and columns of pairs from the memory budget,
classes of tiles whose adjoint regions cannot overlap, and the launch configuration chosen
once per shape class. Plain Python and torch: importable (and tested) without a GPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ray_convrfm.options import DEFAULT_MEMORY_BUDGET_MB

#: Pairs (columns z_j) per Triton program; one program shares its x_i loads across them.
BLOCK_J = 16

#: First-layer positions per program (a tile with its halo) where the device gives no L2 size.
REGION_POSITIONS = 4096
#: Launch configurations tried once per shape class on CUDA; the first one elsewhere.
CONFIGS = ({"BLOCK_P": 64, "num_warps": 2}, {"BLOCK_P": 64, "num_warps": 4},
           {"BLOCK_P": 128, "num_warps": 4}, {"BLOCK_P": 128, "num_warps": 8},
           {"BLOCK_P": 256, "num_warps": 8})


@dataclass(frozen=True)
class LaunchPlan:
    """How one kernel block is cut into launches: ``rows`` x ``cols`` image pairs per launch,
    each pair split into ``tiles`` (y, x) tiles of ``tile`` (h, w) last-layer positions, whose
    first-layer region with the halo has ``region`` positions (``saved`` over all layers)."""

    rows: int
    cols: int
    tile: tuple[int, int]
    tiles: tuple[int, int]
    region: int
    saved: int

    @property
    def n_tiles(self) -> int:
        return self.tiles[0] * self.tiles[1]


def _planes(adjoint: bool) -> int:
    """Scratch planes of a program: the forward's ping-pong (S, theta); the adjoint's (gS, gT,
    gZ) ping-pong, which reuses them."""
    return 6 if adjoint else 4


def region_positions(device: torch.device, itemsize: int, adjoint: bool) -> int:
    """First-layer positions per program, from the device: a program's scratch (planes x BLOCK_J
    x positions), which the window sums reread q^2 times, should fit its SM's share of L2."""
    if device.type != "cuda":
        return REGION_POSITIONS
    props = torch.cuda.get_device_properties(device)
    l2 = int(getattr(props, "L2_cache_size", 0) or 0)
    if not l2:
        return REGION_POSITIONS
    share = l2 // max(1, props.multi_processor_count)
    return int(min(16384, max(256, share // (_planes(adjoint) * BLOCK_J * itemsize))))


def position_tile(grids, q: int, region: int) -> tuple[int, int]:
    """The largest tile of last-layer positions whose first-layer region (the tile plus the
    (depth - 1)(q - 1) halo the window sums need) has at most ``region`` positions: the whole
    grid when the first layer fits, at least one position however deep the kernel."""
    (h0, w0), (hl, wl) = grids[0], grids[-1]
    if h0 * w0 <= region:
        return hl, wl
    halo = (len(grids) - 1) * (q - 1)
    th = min(hl, max(1, math.isqrt(region) - halo))
    tw = min(wl, max(1, region // (th + halo) - halo))
    return th, tw


def _region_sizes(grids, q: int, tile: tuple[int, int]) -> list[int]:
    """Positions of a tile's region in every layer (the halo shrinks by q - 1 per layer)."""
    depth = len(grids)
    return [min(tile[0] + (depth - 1 - layer) * (q - 1), h)
            * min(tile[1] + (depth - 1 - layer) * (q - 1), w)
            for layer, (h, w) in enumerate(grids)]


def plan_launch(n: int, m: int, grids, q: int, itemsize: int, device: torch.device,
                budget_mb: float | None = None, adjoint: bool = False,
                region: int | None = None) -> LaunchPlan:
    """The one place that sizes Triton launches, from the device and the memory budget.

    Position tiles bound a program's scratch whatever the image size (``region_positions``);
    columns are whole multiples of BLOCK_J (at least one block) and rows fill the rest of the
    budget (at least one), counting every tile's scratch, saved values and partial sum.
    """
    region = region_positions(device, itemsize, adjoint) if region is None else int(region)
    tile = position_tile(grids, q, region)
    hl, wl = grids[-1]
    tiles = (-(-hl // tile[0]), -(-wl // tile[1]))
    sizes = _region_sizes(grids, q, tile)
    saved = sum(sizes) if adjoint else 0
    per_pair = itemsize * tiles[0] * tiles[1] * (_planes(adjoint) * sizes[0] + 2 * saved + 1)
    budget = (DEFAULT_MEMORY_BUDGET_MB if budget_mb is None else budget_mb) * 2**20
    pairs = max(1, int(budget // per_pair))
    cols = min(m, max(BLOCK_J, pairs // BLOCK_J * BLOCK_J))
    rows = min(n, max(1, pairs // max(cols, 1)))
    return LaunchPlan(rows, cols, tile, tiles, sizes[0], max(saved, 1))


def _colours(plan: LaunchPlan, halo: int, adjoint: bool):
    """Launches of tiles as (cy, cx, step_y, step_x, tiles_y, tiles_x): the forward runs every
    tile at once (each writes its own partial sum); the adjoint accumulates into first-layer
    positions, so one launch only holds tiles whose regions cannot overlap (origins at least
    tile + halo apart)."""
    (ty, tx), (th, tw) = plan.tiles, plan.tile
    if not adjoint:
        return [(0, 0, 1, 1, ty, tx)]
    sy = 1 + -(-halo // th) if ty > 1 else 1
    sx = 1 + -(-halo // tw) if tx > 1 else 1
    out = []
    for cy in range(min(sy, ty)):
        for cx in range(min(sx, tx)):
            out.append((cy, cx, sy, sx, len(range(cy, ty, sy)), len(range(cx, tx, sx))))
    return out


_TUNED: dict = {}


def tuned_config(key, trial, configs=CONFIGS, timer=None) -> dict:
    """The fastest of ``configs`` for a shape class (``key``), chosen once per process: each is
    run by ``trial(config)`` once to compile and once timed by ``timer(fn) -> seconds``. Without
    a timer (no CUDA) the first configuration is used."""
    if timer is None:
        return dict(configs[0])
    if key not in _TUNED:
        seconds = []
        for cfg in configs:
            trial(cfg)
            seconds.append(timer(lambda cfg=cfg: trial(cfg)))
        _TUNED[key] = dict(configs[min(range(len(configs)), key=seconds.__getitem__)])
    return _TUNED[key]


def tuned_configs() -> dict:
    """The launch configurations chosen so far in this process, by shape class (for reports)."""
    return {str(key): dict(cfg) for key, cfg in _TUNED.items()}


def _cuda_timer(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0
