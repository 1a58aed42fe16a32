"""Benchmark grids: configs x seeds with the core loop, resumable, mean ± std tables."""

from .runner import aggregate, deep_merge, make_config, markdown, read_run, run_grid, select_rows, slug, write_results

__all__ = ["aggregate", "deep_merge", "make_config", "markdown", "read_run", "run_grid", "select_rows", "slug", "write_results"]
