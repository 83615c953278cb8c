"""Training: the mode-agnostic LightningModule, the training modes, callbacks and the run."""
