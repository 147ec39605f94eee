import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_close

from facehd import flame
from facehd.cli import main
from facehd.errors import InputError
from facehd.synth import bfm as sb
from facehd.synth.flame import METRES_PER_UNIT, make_synth_flame, write_synth_flame

RES = 32  # ~770 vertices


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return flame.load_flame_folder(write_synth_flame(tmp_path_factory.mktemp("sflame"), RES, seed=0))


def test_real_layout(assets):
    m = assets.model
    assert m.shapedirs.shape == (m.n_vertices, 3, 400) and m.posedirs.shape == (m.n_vertices, 3, 36)
    assert m.J_regressor.shape == (5, m.n_vertices) and m.weights.shape == (m.n_vertices, 5)
    assert m.parents.tolist() == [-1, 0, 1, 1, 1]
    assert_close(m.weights.sum(1), np.ones(m.n_vertices))
    assert_close(m.J_regressor.sum(1), np.ones(5))
    # a UV seam and a crown with their own texture vertices, as FLAME's head_template.obj
    assert len(assets.template.uvs) > m.n_vertices
    assert not np.array_equal(assets.template.faces, assets.template.faces_uv)


def test_deterministic_for_a_seed():
    a, _, ea = make_synth_flame(RES, seed=3)
    b, _, eb = make_synth_flame(RES, seed=3)
    c, _, _ = make_synth_flame(RES, seed=4)
    assert np.array_equal(a["shapedirs"], b["shapedirs"]) and np.array_equal(ea.bary, eb.bary)
    assert not np.array_equal(a["shapedirs"], c["shapedirs"])
    assert np.array_equal(a["v_template"], c["v_template"])  # the mean depends on the resolution only


def test_face_is_synth_bfm_face(assets):
    """The 51 landmarks sit at SynthBFM's designed (x, y) positions (metres, up to the origin
    shift) and the surface is a closed head: crown above, neck below, ears beside."""
    m = assets.model
    lmk = flame.embedded_points(m.v_template, m.faces, assets.embedding)
    design = sb.landmark_design()[17:] * METRES_PER_UNIT
    offset = (lmk[:, :2] - design).mean(0)
    assert_close(lmk[:, :2] - offset, design, atol=1e-9)
    nose = lmk[30 - 17]
    assert nose[2] == pytest.approx(m.v_template[:, 2].max(), abs=0.01)  # the nose is frontmost
    extent = np.ptp(m.v_template, axis=0)
    assert 0.14 < extent[0] < 0.2 and 0.3 < extent[1] < 0.4 and 0.18 < extent[2] < 0.26


def test_jaw_opens_the_mouth_not_the_crown(assets):
    m = assets.model
    t = flame.FlameTensors.of(m, torch.float64)
    zero = torch.zeros(1, 10, dtype=torch.float64)
    pose = torch.zeros(1, 15, dtype=torch.float64)
    pose[0, 6] = 0.2  # jaw about x
    rest = flame.flame_forward(t, zero, zero, torch.zeros_like(pose)).vertices[0].numpy()
    moved = flame.flame_forward(t, zero, zero, pose).vertices[0].numpy()
    lmk_rest = flame.embedded_points(rest, m.faces, assets.embedding)
    lmk_moved = flame.embedded_points(moved, m.faces, assets.embedding)
    lower_lip, nose = 57 - 17, 30 - 17
    assert np.linalg.norm(lmk_moved[lower_lip] - lmk_rest[lower_lip]) > 0.01
    assert np.linalg.norm(lmk_moved[nose] - lmk_rest[nose]) < 1e-3
    crown = np.argmax(rest[:, 1])
    assert_close(moved[crown], rest[crown], atol=1e-12)


def test_bad_resolution():
    with pytest.raises(InputError, match="even number"):
        make_synth_flame(33)


def test_cli(tmp_path):
    result = CliRunner().invoke(main, ["synth", "flame", "--out", str(tmp_path / "f"), "--resolution", "24"])
    assert result.exit_code == 0, result.output
    assert "vertices" in result.stdout
    assert flame.load_flame_folder(tmp_path / "f").model.n_vertices < 500
