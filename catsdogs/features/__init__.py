"""Stage 2, the features: the content-addressed HDF5 cache's format (``cache``), backbone forward
passes into it (``extraction``; int8 in ``int8``) and the alignment / concatenation of backbones
into combinations (``fusion``)."""
