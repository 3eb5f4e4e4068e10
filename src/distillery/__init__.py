"""distillery: distill a large teacher language model into a small student for consumer devices."""

__version__ = "0.1.0"
