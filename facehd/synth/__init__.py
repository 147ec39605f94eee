"""Procedural stand-ins for the licensed assets, written in the real file formats (DESIGN.md 7)."""

from facehd.synth.bfm import DEFAULT_RESOLUTION, EXPRESSION_NAMES, make_synth_bfm, write_synth_bfm

__all__ = ["DEFAULT_RESOLUTION", "EXPRESSION_NAMES", "make_synth_bfm", "write_synth_bfm"]
