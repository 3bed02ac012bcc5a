"""sockmap: forward guest listeners to host localhost, and explain every port conflict."""

__version__ = "0.1.0"
