"""tidesync benchmarks: ``python -m benchmarks run [--quick] [--only GROUP ...]``."""
