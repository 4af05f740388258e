"""Training the AnyDressing garment weights: dataset, the training model and trainer."""
