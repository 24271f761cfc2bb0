"""DiffGraph planner."""
