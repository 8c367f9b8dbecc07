"""Mapping stored paths to canonical and target paths: presets, rules with views, layer groups."""
