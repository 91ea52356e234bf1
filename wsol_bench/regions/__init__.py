"""Heatmaps -> regions: upsampling and normalisation, thresholds, connected components or
OpenCV contours, boxes and box-union masks, with the rasterisation protocols in one place
(docs/protocol.md sections 3 and 4)."""
