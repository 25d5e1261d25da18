"""Score every checkpoint on a fixed prompt set with fixed seeds, and pick the best step."""
