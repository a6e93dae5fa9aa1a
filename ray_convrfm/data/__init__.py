"""Image data sets: bundled, IDX, .npz and parquet shards.

Modules, each importing only those before it: ``images`` (:class:`ImageDataset`, digits,
``.npz``, noise frame), ``idx`` (IDX files), ``parquet_fs`` and ``parquet_io`` (the parquet
layout: file systems, codecs, writer, reader), ``ondisk`` (``DiskImages``, the base of every set
read where it is used), ``hf_parquet`` (Hugging Face shards as a parquet manifest),
``folder_tree`` (ImageNet-style trees), ``conversion`` (one Ray task per output file),
``datasets`` (Fashion-MNIST and the ``load_dataset(spec)`` dispatcher), ``parquet`` (lazy
splits for fits on Ray, ``convert``) and ``sources`` (on-disk sets by spec). Nothing is
imported here, so that loading in-memory data never imports pyarrow.
"""
