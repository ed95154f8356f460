"""Dataset sources, caching and slicing."""
