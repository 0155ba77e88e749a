"""Serving the champion: TF Serving's REST API."""
