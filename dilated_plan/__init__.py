"""dilated_plan: the framework-free plan of dilated attention, shared by jax_dilated and torch_ref.

Pure Python and NumPy: the validated configuration and its error messages, head groups and
branches (:mod:`dilated_plan.config`), argument checks (:mod:`dilated_plan.checks`), the ring
sharding plan (:mod:`dilated_plan.ring`) and block-sparse layouts (:mod:`dilated_plan.blocks`).
Importing it imports neither JAX nor torch, so each framework package builds on it without
importing the other; the float64 reference of the tests (``parity_tests/reference*.py``) does
not use it, so it checks the plan as well. docs/semantics.md states what the plan means.
"""

from dilated_plan.blocks import PATTERNS, BlockTables, block_budget, block_layout, block_tables, check_block_options
from dilated_plan.config import MERGES, Branch, DilatedConfig, Heads, ModuleOptions, default_scale
from dilated_plan.ring import ring_chunk_length, ring_padded_length, ring_plan

__all__ = [
    "MERGES",
    "PATTERNS",
    "BlockTables",
    "Branch",
    "DilatedConfig",
    "Heads",
    "ModuleOptions",
    "block_budget",
    "block_layout",
    "block_tables",
    "check_block_options",
    "default_scale",
    "ring_chunk_length",
    "ring_padded_length",
    "ring_plan",
]
