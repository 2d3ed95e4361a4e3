"""Stage 5, the app side: exports (Keras / Core ML / TFLite), prediction, CAM overlays, the
"neither cat nor dog" flag."""
