"""The fxforge version, recorded in saved models (``fxforge.save``) and shown by the CLI."""

__version__ = "0.1.0"
