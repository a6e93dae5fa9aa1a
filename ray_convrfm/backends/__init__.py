"""Where kernels are computed: in this process or on Ray shard workers, behind one Protocol."""
