"""moe-specialist: extract small translation specialists from mixture-of-experts LLMs by pruning experts."""

__version__ = "0.1.0"
