"""Teacher-trajectory caches (DESIGN section 5): config and key, targets, storage layout, and the Ray stage."""
