"""Expert-parallel load balancing: plan which expert each physical slot serves."""

from eplb.algorithm import EplbPlan, balancedness, log2phy_of, rebalance_experts
from eplb.incremental import num_moves, rebalance_experts_incremental

__all__ = [
    "EplbPlan",
    "balancedness",
    "log2phy_of",
    "num_moves",
    "rebalance_experts",
    "rebalance_experts_incremental",
]
