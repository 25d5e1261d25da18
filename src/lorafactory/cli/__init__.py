"""The ``lorafactory`` command line: thin typer commands over the pipeline, one module per area.

``base`` holds what every command shares; importing the others registers their commands on ``app``,
in this order, which is the order ``lorafactory --help`` lists them in.
"""

# isort: off
from lorafactory.cli import stages, prune, status, fleet, anime, report, config, demo  # noqa: F401 - they register commands

# isort: on
from lorafactory.cli.base import app, err, out, reflow_docstrings

reflow_docstrings(app)

__all__ = ["app", "err", "out"]
