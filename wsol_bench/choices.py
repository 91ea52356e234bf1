"""The valid values of every setting that names one of a few choices, in one module that every
stage may import and that imports nothing: the modules that act on a setting and the checks that
refuse a bad value before torch loads (wsol_bench.config.checks) read the same tuple."""

RUN_MODES = ("run", "summary")  # mode
TARGET_POLICIES = ("predicted", "label")  # target: the class a map explains
MAP_DTYPES = ("float32", "float16")  # store.dtype
RESIZE_MODES = ("squash", "timm")  # preprocess.resize
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
BOX_PROTOCOLS = ("agcam", "exact")  # metric.box_protocol
IMAGE_FILTERS = ("correct", "all")  # metric.image_filter
FAITHFULNESS_MODES = ("abpc", "deletion", "insertion")  # faithfulness.mode of the pixel-perturbation curves
# every faithfulness measure (faithfulness.mode; each option of the faithfulness group sets it)
FAITHFULNESS_MEASURES = (*FAITHFULNESS_MODES, "chefer_perturbation", "road", "saco")
FAITHFULNESS_INTEGRALS = ("mean", "trapezoid")  # faithfulness.integral
SWEEP_BOXES = ("opencv", "components")  # sweep.boxes
SEGMENTATION_PROTOCOLS = ("chefer",)  # segmentation.protocol
RESUME_MODES = ("auto", "true", "false")  # wsol-bench-train resume (a bool counts as true or false)
