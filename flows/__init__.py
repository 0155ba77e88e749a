"""Prefect flows: each wires the stages in `tasks/` together and decides nothing else."""
