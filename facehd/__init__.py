"""facehd: data-first library for detailed 3D face reconstruction research (HRN, FaceHD-100)."""

__version__ = "0.1.0"
