"""Init-time measurements of signal propagation (science.md, Quantities)."""

from healthcheck.probes.measure import Measurements, Point, ProbeOptions, line_gradient_correlation, measure

__all__ = ["Measurements", "Point", "ProbeOptions", "line_gradient_correlation", "measure"]
