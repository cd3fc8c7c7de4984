"""privbench: rebuild published private-training benchmarks from scratch.

The package holds the real logic; the Snakemake rules in ``workflow/`` only
call its command line (``python -m privbench ...``). Data flows one way:

    config preset -> plan of runs -> one isolated run per configuration
    -> result record (JSON) -> tidy table -> charts -> pages -> site
"""

__version__ = "0.1.0"
