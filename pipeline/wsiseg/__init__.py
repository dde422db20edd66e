"""wsiseg: tumor segmentation of whole-slide images with a pathologist in the loop (QuPath).

The pipeline, in the order it runs (one module per step):

- ``slide/``     read slides (OpenSlide, TIAToolbox), the ``Frame``, tissue mask, resampling
- ``tiling``     Dask tasks: slide → ``image`` chunks of the zarr slide ``store``
- ``infer``      GuideNet (``nets``) over every tissue patch → ``guide`` probability
- ``contours``   probability → polygons → ``qupath`` GeoJSON
- ``scribbles/`` pathologist scribbles: rasterise, encode as distance maps, simulate
- ``refine``     RefineNet (or random walker) on the windows the scribbles touch
- ``train/``     training GuideNet and RefineNet
- ``evaluate``   IoU, Dice, PAIP score, interactive NoI
- ``cohort``     many slides: run ledger, summary, Dask distributed
"""

__version__ = "0.1.0"
