"""Shard sets: writers, the streaming reader and per-task decoding."""
