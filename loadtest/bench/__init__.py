"""Shared pieces of the benchmarks: child processes on loopback and benchmark prompts."""
