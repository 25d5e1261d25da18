"""The factory's analytics from the state store: the reference article's charts in one offline report.

``rows`` reads one row per character (and every stage execution) from the store; ``charts`` turns
them into figures with their tables; ``page`` writes ``report.html`` (every figure inline), the
figures as PNG and the tables as CSV. Nothing here touches the network.
"""
