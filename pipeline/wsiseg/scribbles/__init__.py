"""Pathologist scribbles: rasterise (``raster``), encode as distance maps (``encode``), simulate
(``simulate``)."""
