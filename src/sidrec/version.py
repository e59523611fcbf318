"""The package version: an input of every stage's fingerprint (sidrec.run), kept apart so that
modules can read it without importing the package's API."""

__version__ = "0.1.0"
