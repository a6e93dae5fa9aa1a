"""Apart from the library: the command line, benchmarks, the cost model and pictures."""
