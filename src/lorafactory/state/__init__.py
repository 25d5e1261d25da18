"""The state store: characters, runs, stage executions, checkpoints and metrics in SQL."""

from lorafactory.state.store import Store

__all__ = ["Store"]
