"""SparCode training: data, models, training loop, metrics and export to an index."""
