"""Image data sets: bundled, IDX, .npz and parquet shards."""
