"""Built-in rewrite passes (importable as `graphprune.passes`), one file per pass."""
