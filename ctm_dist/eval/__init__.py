"""Evaluation, halting sweeps, plots and export."""
