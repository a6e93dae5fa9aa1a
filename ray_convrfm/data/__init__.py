"""Image data sets: bundled, IDX, .npz and parquet shards.

Modules, each importing only those before it: ``images`` (:class:`ImageDataset`, digits,
``.npz``, noise frame), ``idx`` (IDX files), ``parquet_io`` (the parquet layout: codecs, writer,
reader), ``datasets`` (Fashion-MNIST and the ``load_dataset(spec)`` dispatcher) and ``parquet``
(lazy splits for fits on Ray, ``convert``). Nothing is imported here, so that loading in-memory
data never imports pyarrow.
"""
