"""Offline tools for run checkpoints: inspect them, export a consolidated model file."""
