"""Runnable examples of tidesync in use (each module documents how to run it)."""
