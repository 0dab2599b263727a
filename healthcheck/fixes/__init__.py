"""Fixes: transforms applied to a copy of the model, verified by measuring again."""

from healthcheck.fixes.transforms import TRANSFORMS, JoinRewriter, Transform
from healthcheck.fixes.verify import FixResult, fix, profile_numbers

__all__ = ["TRANSFORMS", "FixResult", "JoinRewriter", "Transform", "fix", "profile_numbers"]
