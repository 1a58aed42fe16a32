"""Searches over the network itself: the memory-budget width/precision trade-off (002)."""

from .budget import BudgetChoice, budget_table, format_table, make_suite, widest_for_budget

__all__ = ["BudgetChoice", "budget_table", "format_table", "make_suite", "widest_for_budget"]
