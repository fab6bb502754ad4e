"""Scenarios: drive guest I/O and jobs on a copy-before-write topology, observe."""
