"""Checks of the Ray cluster configs in ``cluster/`` (``dvfl validate-cluster``)."""
