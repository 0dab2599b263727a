"""Init-time measurements of signal propagation (science.md, Quantities)."""

from healthcheck.probes.measure import Measurements, Point, ProbeOptions, measure

__all__ = ["Measurements", "Point", "ProbeOptions", "measure"]
