"""The kernel mathematics: patches, the ConvRFM kernel and its adjoint, the patch AGOP, ridge
solves. Pure functions of tensors and explicit parameters: no Ray, no I/O, no progress state
beyond optional bars."""
