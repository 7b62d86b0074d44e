"""Checks of the Ray cluster configs in ``cluster/`` (``python -m dvfl.cluster.validate``)."""
