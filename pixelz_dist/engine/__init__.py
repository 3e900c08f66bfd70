"""The training engine: ``train_model`` (the public verb) and its settings, the loop, the counters and the view
callbacks get, requests and their agreement across ranks, mixed precision, the model call, scheduling, the log line,
per-parameter learning rates, and the seed's multi-GPU convention."""
