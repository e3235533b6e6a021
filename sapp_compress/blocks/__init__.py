"""Block sparsity: one documented 2-D view per layer type and the planning of the weights to prune
(:mod:`.geometry`); the block masks as parametrizations and their fold into the block manifest
(:mod:`.masks`)."""
