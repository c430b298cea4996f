"""Data: phantoms, data sets, manifests and label-map synthesis."""
