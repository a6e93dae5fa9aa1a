"""The Ray layer: shard workers that call the same kernel and AGOP code as a laptop run."""

from .driver import ShardedImages, start_ray

__all__ = ["ShardedImages", "start_ray"]
