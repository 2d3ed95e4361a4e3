"""Stage 2, the features: backbone forward passes into the content-addressed HDF5 cache
(``extraction``) and the alignment / concatenation of backbones into combinations (``fusion``)."""
