"""Back ends and benchmarking (importable as `graphprune.export`)."""
