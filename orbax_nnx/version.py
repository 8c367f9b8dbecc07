"""The library version, recorded in the custom metadata of every checkpoint we write."""

__version__ = '0.1.0'
