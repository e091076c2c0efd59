"""The configs and runs behind ``hf-hyperflow train``, ``evaluate`` and ``push`` (and the recipes of the same names).

Each module holds one command: its draccus config dataclass (every option with its help; YAML files and
``--key value`` overrides read by :mod:`hf_hyperflow.parsing`) and a ``run_*`` function that does the work and
raises ``ValueError`` / ``OSError`` / ``LookupError`` for what was given wrong. The ``hf-hyperflow`` command turns
those into one-line errors and exit codes; ``recipes/*.py`` call the same functions.
"""
