"""Built-in rewrite passes (importable as `graphprune.passes`), one file per pass.

Importing this package registers them all; the default pipeline runs them in this order.
"""

from . import (  # noqa: F401
    bench, calibrate, choose_split, distill, drop_layers, evaluate, export, materialize, plan, prune, reconstruct,
    score_depth, verify,
)
