"""Stage entry points and recipes (configuration as code) built on the :mod:`oftsr` library."""
