"""Dataset sources, validation, splits, demo samples, caching and slicing.

``sources`` (the source interface and errors), ``files`` (shared reading of official archive layouts),
``validation`` (checks before training), ``splits`` (paper counts, stratified, leave-one-out), ``demo`` (synthetic
samples in the official layouts), ``transforms`` (the few preprocessing steps MONAI lacks), ``loading`` (memory or
disk cache, 2D slices, loaders); one module per dataset: ``mni`` (the embedded default), ``acdc``, ``brats``,
``mrbrains``, ``flare``, ``promise``, ``hippocampus``, ``busi`` (with ``msd`` for the Decathlon layout).
"""
