"""drop_layers: remove the planned layers from the pruned weights and renumber the rest."""

from __future__ import annotations

import re

from graphprune.pipeline import PassContext, PassResult, register_pass


@register_pass("drop_layers", requires=("plan", "state_dict"), provides=("state_dict",))
def drop_layers(ctx: PassContext) -> PassResult:
    """Drop whole residual blocks (their weights), keeping the order of the others."""
    dropped = set(ctx.plan.dropped_layers)
    if not dropped:
        return PassResult(summary={"dropped": []})
    container = ctx.analysis.layers[0].module.rsplit(".", 1)[0]
    pattern = re.compile(rf"^{re.escape(container)}\.(\d+)\.(.*)$")
    new_index = {old: new for new, old in enumerate(i for i in range(len(ctx.analysis.layers)) if i not in dropped)}
    state = {}
    for name, tensor in ctx.state_dict.items():
        match = pattern.match(name)
        if match is None:
            state[name] = tensor
        elif int(match.group(1)) not in dropped:
            state[f"{container}.{new_index[int(match.group(1))]}.{match.group(2)}"] = tensor
    ctx.state_dict = state
    return PassResult(changed=True, summary={"dropped": sorted(dropped)})
