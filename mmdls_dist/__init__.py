"""mmdls-dist: distributed multi-center training of MM-DLS for advanced NSCLC."""

__version__ = "0.1.0"
