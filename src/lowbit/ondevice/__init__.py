"""On-device training (seed 002, part 3): the pieces NITI and local-loss training share, and the
measured training memory.

* :mod:`.units`: a model as the sequence of units it runs (conv/linear layers, elementwise modules,
  residual blocks), and its split into locally trained blocks;
* :mod:`.intops`: integer tensors with a power-of-two exponent (NITI's format) and their ops;
* :mod:`.memory`: peak memory of one training step, measured, beside :func:`lowbit.cost.training_memory`.

The methods themselves are :mod:`lowbit.methods.niti` and :mod:`lowbit.methods.local`.
"""
