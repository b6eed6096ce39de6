"""Prefect flows: orchestration only; every task calls a stage function in `components`."""
