"""The train stage's plain code: the model and its presets, the fit, checkpoints that survive a lost host,
the SavedModel export."""
