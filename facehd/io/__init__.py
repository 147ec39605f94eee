"""Mesh file IO: the `Mesh` record and OBJ, PLY and VRML readers / writers."""

from facehd.io.mesh import Mesh, load_mesh, save_mesh
from facehd.io.obj import read_obj, write_obj
from facehd.io.ply import read_ply, write_ply
from facehd.io.wrl import read_wrl

__all__ = ["Mesh", "load_mesh", "read_obj", "read_ply", "read_wrl", "save_mesh", "write_obj", "write_ply"]
