"""``python -m uresnet ...``: the ``uresnet`` command line (see :mod:`uresnet_models.cli`).

This package only makes the command runnable as a module, which ``torchrun -m uresnet`` needs;
the library is :mod:`uresnet_ops` and :mod:`uresnet_models`."""
