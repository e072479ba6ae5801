"""The Typer command-line interface.

Heavy imports (torch, Ray, jobs, model) stay inside the command functions.
"""
