"""Evaluation: :func:`~pixelz_dist.evaluation.evaluate.evaluate_model` (the loss and metrics of a model over a
dataset, each sample counted exactly once, also under torchrun), the exact sharding behind it, and metrics
(:class:`~pixelz_dist.evaluation.metrics.MeanIoU`)."""
