"""The factory: a durable queue of characters in the state store, driven from above the pipeline."""
