"""Stage 1, the data: finding images in a folder layout (``layout``) and decoding them (``images``)."""
