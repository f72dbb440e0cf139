"""A user plugin: a custom pass registered from a module named in the spec's `plugins`."""

from graphprune.pipeline import PassContext, PassResult, register_pass


@register_pass("count_pruned_ffn", requires=("plan",))
def count_pruned_ffn(ctx: PassContext, label: str = "") -> PassResult:
    """Count the FFN neurons the plan removes (reads the plan; changes nothing)."""
    removed = sum(g.size - ctx.plan.sizes[g.name] for g in ctx.analysis.groups_of_kind("ffn"))
    return PassResult(changed=False, summary={"label": label, "pruned_units": removed})
