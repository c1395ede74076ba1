"""Input pipelines. Each yields (images, labels) micro-batches of identical count on every rank."""
