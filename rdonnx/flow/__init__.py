"""The compress flow: options and targets, curves, calibration and the realizer, bound searches,
one module per method, the pipeline."""
