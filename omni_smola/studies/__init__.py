"""Studies: arms x seeds of training runs, run in dependency order, aggregated into tables
and figures (`python -m omni_smola.study`, docs/DESIGN.md §8.1)."""
