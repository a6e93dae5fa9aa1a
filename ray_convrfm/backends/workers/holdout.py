"""A shard worker's scoring of images it does not hold: held-out sets (validation, monitor),
kept where they were spread and scored for every ridge at once, and blocks of test images the
driver sends; only numbers (counts, class scores) leave the worker.
"""

from __future__ import annotations

import numpy as np
import torch

from ray_convrfm.backends.chunks import CenterBlocks, chain_shape, prepared_chunk, resolve
from ray_convrfm.backends.protocol import LayerState


class HoldoutScoring:
    """The scoring methods of ``ShardWorker`` (its ``ShardCore`` gives the sides)."""

    def _held_out_kernel(self, images, chain, layer: LayerState, centers: CenterBlocks,
                         block: int):
        """(r0, r1, K(chain(images[r0:r1]), centers)) for chunks of stored images that are not
        in the shard (held-out and test images): at most ``block`` images and one prepared
        chunk at a time, converted and featurised here."""
        shape = chain_shape(np.shape(images)[1:], chain)
        step = min(block, prepared_chunk(shape, layer.spec, layer.basis))
        for r0, r1 in self._chunks(len(images), step):
            Z = self._layer_input(np.asarray(images[r0:r1]), chain, layer.spec.torch_dtype)
            yield r0, r1, self._against_centers(self._prepare(Z, layer), layer, centers)

    def scores(self, rows, chain, alpha, layer: LayerState,
               centers: CenterBlocks) -> np.ndarray:
        """Class scores K(chain(rows), centers) @ alpha (float64) for a block of images the
        driver sends (test images; ``chain`` is the feature map they pass through first, the
        centers being the layer's own); only (rows, classes) leaves the worker."""
        rows = np.asarray(resolve(rows))
        alpha = torch.as_tensor(np.asarray(resolve(alpha), dtype=np.float64),
                                device=self.device)
        out = np.empty((len(rows), alpha.shape[1]))
        for r0, r1, K in self._held_out_kernel(rows, resolve(chain), layer, centers,
                                               len(rows)):  # products in torch (threads.py)
            out[r0:r1] = (K.to(torch.float64) @ alpha).cpu().numpy()
        return out

    def evaluate(self, name: str, key: str, images, labels, coefs, layer: LayerState,
                 centers: CenterBlocks, block: int) -> np.ndarray:
        """Per coefficient matrix in ``coefs`` (R, m, c): [correct, summed squared error on the
        one-hot targets, count] over this worker's part of a held-out set (validation,
        monitor). The images (``name``'s part under ``key``: rows loaded here once, parquet
        rows read here, and kept for the next call) pass through the layer's chain block by
        block; only (R, 3) numbers leave."""
        if self._holdouts.get(name, (None,))[0] != key:
            self._holdouts[name] = (key, resolve(images))
        images = self._holdouts[name][1]
        coefs = torch.as_tensor(np.asarray(resolve(coefs)), dtype=torch.float64,
                                device=self.device)
        labels = torch.as_tensor(np.asarray(resolve(labels), dtype=np.int64),
                                 device=self.device)
        out = torch.zeros(coefs.shape[0], 3, dtype=torch.float64)
        for r0, r1, K in self._held_out_kernel(images, layer.chain, layer, centers, block):
            S = torch.einsum("bm,rmc->rbc", K.to(torch.float64), coefs)
            y = labels[r0:r1]
            target = torch.nn.functional.one_hot(y, coefs.shape[2]).to(torch.float64)
            out[:, 0] += (S.argmax(-1) == y).sum(-1).cpu().double()
            out[:, 1] += ((S - target) ** 2).sum((1, 2)).cpu()
            out[:, 2] += len(y)
        return out.numpy()
