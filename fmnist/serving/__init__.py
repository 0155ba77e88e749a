"""Serving the champion and its labeled versions: TF Serving's REST and gRPC APIs, the Open Inference
Protocol, Prometheus metrics (fmnist.serving.server is the entry point)."""
