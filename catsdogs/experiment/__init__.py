"""Stage 3, the experiment file: YAML grids validated into an ``Experiment`` (``spec``)."""
