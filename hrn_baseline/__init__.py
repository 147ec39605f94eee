"""hrn_baseline package."""
