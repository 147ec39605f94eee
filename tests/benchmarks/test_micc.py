"""The MICC protocol (aligned distance, symmetric score, aggregation), its input checks, the
evaluation of a tiny synthetic set end to end, and the `facehd-bench micc` command."""

from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import assert_close

from benchmarks import micc
from benchmarks.cli_micc import micc_command
from benchmarks.published import MICC_PUBLISHED
from benchmarks.synthetic import REFERENCE_METHODS, SyntheticMicc, random_rotation
from facehd.errors import FileFormatError, InputError
from facehd.io import Mesh, save_mesh

RESOLUTION = 28  # SynthBFM template for the unit tests: ~800 vertices
SET_RESOLUTION = 32  # the tiny synthetic benchmark: 2 subjects, ~1,100-vertex template
SET_SUBJECTS = 2


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    from facehd.synth.bfm import write_synth_bfm

    return micc.load_template(write_synth_bfm(tmp_path_factory.mktemp("tpl") / "m.mat", resolution=RESOLUTION))


@pytest.fixture(scope="module")
def face(template):
    """An asymmetric face on the template topology (mean + a cheek bump), template units."""
    v = template.vertices.copy()
    bump = np.exp(-np.sum((v[:, :2] - [0.35, -0.2]) ** 2, axis=1) / (2 * 0.12**2))
    v[:, 2] += 0.03 * bump
    return v


def score(template, gt, pred, **kw):
    return micc.micc_score(gt, pred, template.faces, nose_index=template.nose_tip,
                           mm_per_unit=template.mm_per_unit, **kw)


# --- the protocol ------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", micc.DIRECTIONS)
@pytest.mark.parametrize("metric", micc.METRICS)
def test_identical_meshes_score_zero(template, face, direction, metric):
    result = score(template, face, face, direction=direction, metric=metric)
    assert result.score_mm < 1e-5


@pytest.mark.parametrize("scale", [0.5, 1.7])
def test_a_similarity_of_the_ground_truth_scores_zero(template, face, scale):
    rng = np.random.default_rng(int(scale * 10))
    moved = scale * face @ random_rotation(rng, 180.0).T + rng.normal(0, 1.0, 3)
    result = score(template, face, moved)
    assert result.score_mm < 1e-5 and result.gt_to_pred_mm < 1e-5 and result.pred_to_gt_mm < 1e-5


@pytest.mark.parametrize("metric", micc.METRICS)
def test_a_plane_offset_by_d_is_at_distance_d_before_alignment(metric):
    # the distance part alone: points of a plane offset by d along its normal, over its interior
    g = np.linspace(-1.0, 1.0, 21)
    xx, yy = np.meshgrid(g, g)
    plane = np.stack([xx.ravel(), yy.ravel(), np.zeros(xx.size)], axis=1)
    idx = np.arange(xx.size).reshape(xx.shape)
    faces = np.concatenate([np.stack([idx[:-1, :-1], idx[:-1, 1:], idx[1:, 1:]], -1).reshape(-1, 3),
                            np.stack([idx[:-1, :-1], idx[1:, 1:], idx[1:, :-1]], -1).reshape(-1, 3)])
    d_mm = 1.25
    points = plane + [0.0, 0.0, d_mm / 100.0]
    distances = micc.surface_distance_mm(points, plane, faces, metric=metric, mm_per_unit=100.0)
    assert_close(distances, np.full(len(points), d_mm), atol=1e-9)


def test_a_local_bump_raises_the_error_only_near_the_bump(template, face):
    v = face
    centre = np.array([-0.3, 0.45])  # the subject's right forehead
    r = np.linalg.norm(v[:, :2] - centre, axis=1)
    bumped = v.copy()
    bumped[:, 2] += 0.03 * np.exp(-(r**2) / (2 * 0.06**2))  # 3 mm high, 6 mm sigma
    result = score(template, v, bumped)
    err = result.vertex_mm
    near, far = r < 0.06, (r > 0.25) & np.isfinite(err)
    assert np.nanmax(err[near]) > 1.5
    assert np.nanmean(err[far]) < 0.05 and np.nanmax(err[far]) < 0.2


def test_reflections_are_never_used_to_align(template):
    # one side of the face pushed out (quadratically, which no rotation undoes), then mirrored
    face = template.vertices.copy()
    face[:, 2] += 0.15 * np.maximum(face[:, 0], 0.0) ** 2  # up to 8 mm
    mirrored = face * [-1.0, 1.0, 1.0]
    result = score(template, face, mirrored)
    assert result.score_mm > 0.1  # allowing a reflection would have matched it exactly (0)
    forward = micc.aligned_distance(face, mirrored, template.faces, nose_index=template.nose_tip)
    assert np.linalg.det(forward.transform.rotation) > 0


def test_scores_do_not_depend_on_vertex_order_face_order_or_winding(template, face):
    rng = np.random.default_rng(3)
    pred = face + rng.normal(0, 0.003, face.shape) + 0.01 * np.sin(5 * face[:, [1, 2, 0]])
    perm = rng.permutation(len(face))
    inverse = np.argsort(perm)
    faces = inverse[template.faces][rng.permutation(len(template.faces))]
    flip = rng.random(len(faces)) < 0.4
    faces[flip] = faces[flip][:, ::-1]
    for metric in micc.METRICS:
        reference = score(template, face, pred, metric=metric)
        shuffled = micc.micc_score(face[perm], pred[perm], faces, nose_index=int(inverse[template.nose_tip]),
                                   metric=metric)
        assert abs(shuffled.score_mm - reference.score_mm) < 1e-9, metric
        back = shuffled.vertex_mm[inverse]
        assert np.array_equal(np.isnan(back), np.isnan(reference.vertex_mm))  # the same crop
        assert_close(np.nan_to_num(back), np.nan_to_num(reference.vertex_mm), atol=1e-9)


def test_point_to_plane_is_at_most_point_to_surface(template, face):
    rng = np.random.default_rng(1)
    pred = face + rng.normal(0, 0.005, face.shape)
    surface = score(template, face, pred, metric="point_to_surface")
    plane = score(template, face, pred, metric="point_to_plane")
    assert 0 < plane.score_mm < surface.score_mm


def test_crop_radius_and_subject_28():
    assert micc.crop_radius_mm(1) == 95.0 and micc.crop_radius_mm(28) == 60.0
    options = micc.MiccOptions()
    assert options.radius_mm(28) == 60.0 and options.radius_mm(27) == 95.0


def test_crop_mask_converts_mm_to_units(template):
    v = template.vertices
    mask = micc.crop_mask(v, template.nose_tip, 60.0, 100.0)
    assert_close(mask, np.linalg.norm(v - v[template.nose_tip], axis=1) <= 0.6, atol=0)
    assert mask.sum() < micc.crop_mask(v, template.nose_tip, 95.0, 100.0).sum()


def test_an_empty_crop_mask_is_a_clear_error(template, face):
    with pytest.raises(InputError, match="empty crop"):
        score(template, face, face, radius_mm=0.01)
    with pytest.raises(InputError, match="nose-tip index"):
        micc.micc_score(face, face, template.faces, nose_index=len(face))


def test_aggregation_uses_the_population_std():
    scores = [micc.SubjectScore("m", f"subject_{i:02d}", "Cooperative", "ok", score_mm=float(i)) for i in (1, 2, 3, 4)]
    scores.append(micc.SubjectScore("m", "subject_05", "Cooperative", "missing"))
    (coop, indoor, outdoor) = micc.aggregate(scores)
    assert coop.mean_mm == 2.5 and coop.n_subjects == 4
    assert_close(coop.std_mm, np.sqrt(1.25), atol=1e-12)  # ddof 0; ddof 1 would give 1.291
    assert coop.not_evaluated == ("subject_05",)
    assert indoor.n_subjects == 0 and np.isnan(indoor.mean_mm)


# --- input checks --------------------------------------------------------------------------------


def _save(path, vertices, faces):
    save_mesh(path, Mesh(vertices, faces))
    return path


def test_prediction_units_are_checked(template, face, tmp_path):
    in_mm = _save(tmp_path / "mm.obj", face * 100.0, template.faces)
    with pytest.raises(micc.PredictionUnitsError, match="millimetres.*--units mm"):
        micc.load_prediction(in_mm, template)
    assert_close(micc.load_prediction(in_mm, template, units="mm"), face, atol=1e-9)
    assert_close(micc.load_prediction(in_mm, template, units="model"), face * 100.0, atol=1e-7)
    assert_close(micc.load_prediction(_save(tmp_path / "ok.obj", face, template.faces), template), face, atol=1e-12)
    # the reverse trap: model units against a template in millimetres
    mm_template = micc.make_template(template.vertices * 100, template.faces, template.keypoints, mm_per_unit=1.0)
    with pytest.raises(micc.PredictionUnitsError, match="model units while the template is in mm"):
        micc.load_prediction(tmp_path / "ok.obj", mm_template)


def test_topology_and_degenerate_triangles_are_clear_errors(template, face, tmp_path):
    with pytest.raises(InputError, match="predictions must be on the template topology"):
        micc.load_prediction(_save(tmp_path / "more.obj", np.vstack([face, face[:1]]), template.faces), template)
    perm = np.random.default_rng(0).permutation(len(face))
    # the same surface with its vertices stored in another order (faces renumbered to match)
    reordered = _save(tmp_path / "perm.obj", face[perm], np.argsort(perm)[template.faces])
    with pytest.raises(InputError, match="topology .or vertex order. differs"):
        micc.load_prediction(reordered, template)
    collapsed = face.copy()
    a, b, _ = template.faces[10]
    collapsed[b] = collapsed[a]
    with pytest.raises(InputError, match="degenerate"):
        micc.load_prediction(_save(tmp_path / "deg.obj", collapsed, template.faces), template)
    with pytest.raises(InputError, match="degenerate"):
        micc.make_template(collapsed, template.faces, template.keypoints)
    # the same triangles in another order and winding are the template's topology
    flipped = template.faces[::-1, ::-1]
    assert_close(micc.load_prediction(_save(tmp_path / "flip.obj", face, flipped), template), face, atol=1e-12)


def test_landmarks_and_keypoints_files(tmp_path, template):
    path = tmp_path / "lm.txt"
    np.savetxt(path, np.arange(204.0).reshape(68, 3), header="68 landmarks")
    assert micc.read_landmarks(path).shape == (68, 3)
    np.savetxt(path, np.zeros((67, 3)))
    with pytest.raises(FileFormatError, match="68 x 3"):
        micc.read_landmarks(path)
    kp = tmp_path / "kp.txt"
    kp.write_text(",".join(str(int(k)) for k in template.keypoints))
    assert np.array_equal(micc.read_keypoints(kp), template.keypoints)


def test_find_ground_truth_accepts_the_real_layout(tmp_path, template, face):
    sub = tmp_path / "subject_07" / "Model"
    for tag in ("frontal1", "frontal2"):
        _save(sub / tag / "obj" / f"1109_{tag}.obj", face, template.faces)
        _save(sub / tag / "vrml" / f"1109_{tag}.ply", face, template.faces)  # a second copy: .obj wins
    np.savetxt(sub / "frontal1" / "obj" / "1109_frontal1_landmarks.txt", face[template.keypoints])
    (tmp_path / "subject_08").mkdir()
    (tmp_path / "notes").mkdir()
    index = micc.find_ground_truth(tmp_path)
    scans = index.scans["subject_07"]
    assert [s.scan for s in scans] == ["frontal1", "frontal2"]
    assert all(s.mesh_path.suffix == ".obj" for s in scans) and scans[0].number == 7
    assert scans[0].landmarks_path is not None and scans[1].landmarks_path is None
    assert any("subject_08" in p for p in index.problems)


def _write_ljson(path, points):
    """menpo's LJSON version 3 with the iBUG 68 labels (written by the test, in that format)."""
    labels = {"chin": range(0, 17), "leyebrow": range(17, 22), "reyebrow": range(22, 27), "nose": range(27, 36),
              "leye": range(36, 42), "reye": range(42, 48), "mouth": range(48, 68)}
    data = {"version": 3, "groups": {"LJSON": {
        "landmarks": {"points": np.asarray(points).tolist(), "connectivity": [[i, i + 1] for i in range(16)]},
        "labels": [{"label": k, "mask": list(v)} for k, v in labels.items()]}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_the_real_micc_layout_and_a_ganfit_landmark_tree(tmp_path, template, face):
    gt, tree = tmp_path / "MICC", tmp_path / "MICC_landmarks"
    for tag, stamp in (("frontal1", "110920150452"), ("frontal2", "110920150617")):
        model = gt / "subject_07" / "Model" / tag
        _save(model / "obj" / f"{stamp}.obj", face, template.faces)
        (model / "vrml").mkdir(parents=True)
        (model / "vrml" / f"{stamp}.wrl").write_text("#VRML V2.0 utf8\n")  # the copy: never read
        _write_ljson(tree / "subject_07" / "Model" / tag / "obj" / f"{stamp}.ljson", face[template.keypoints] * 100)
    scans = micc.find_ground_truth(gt, landmarks_dir=tree).scans["subject_07"]
    assert [(s.scan, s.mesh_path.name) for s in scans] == [("frontal1", "110920150452.obj"),
                                                          ("frontal2", "110920150617.obj")]
    assert scans[1].landmarks_path == tree / "subject_07/Model/frontal2/obj/110920150617.ljson"
    assert_close(micc.read_landmarks(scans[0].landmarks_path), face[template.keypoints] * 100, atol=1e-12)
    assert micc.find_ground_truth(gt).scans["subject_07"][0].landmarks_path is None  # no tree, no landmarks
    bad = _write_ljson(tmp_path / "bad.ljson", face[template.keypoints][:60])
    with pytest.raises(FileFormatError, match="68 x 3"):
        micc.read_landmarks(bad)
    missing = json.loads(_write_ljson(tmp_path / "m.ljson", face[template.keypoints]).read_text())
    missing["groups"]["LJSON"]["landmarks"]["points"][30] = [None, None, None]
    (tmp_path / "m.ljson").write_text(json.dumps(missing))
    with pytest.raises(FileFormatError, match="missing"):
        micc.read_landmarks(tmp_path / "m.ljson")
    (tmp_path / "v1.ljson").write_text('{"version": 1}')
    with pytest.raises(FileFormatError, match="version"):
        micc.read_landmarks(tmp_path / "v1.ljson")
    with pytest.raises(InputError, match="landmark directory"):
        micc.find_ground_truth(gt, landmarks_dir=tmp_path / "nowhere")


# --- a tiny synthetic benchmark, end to end ----------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """The synthetic default with 2 subjects: generated, registered (cached) and evaluated once."""
    root = tmp_path_factory.mktemp("micc_cache")
    result = micc.run_micc(cache_root=root, synthetic_subjects=SET_SUBJECTS, synthetic_resolution=SET_RESOLUTION)
    return root, result


def _layout(root) -> SyntheticMicc:
    return SyntheticMicc(next(root.glob("synthetic-micc-v*")))


def test_reference_methods_rank_on_the_synthetic_set(synthetic_run):
    _, result = synthetic_run
    assert result.synthetic and len(result.subjects) == SET_SUBJECTS and not result.gt_problems
    means = {(s.method, s.setting): s.mean_mm for s in result.summaries()}
    for setting in ("Cooperative", "Indoor", "Outdoor"):
        truth, fit, mean = (means[m, setting] for m in ("truth-noise", "landmark-3dmm", "mean-face"))
        # the margins are wider on the default 64-row template, where registration loses less detail
        assert truth < 0.8 * fit and fit < 0.6 * mean, (setting, truth, fit, mean)
    assert all(s.n_subjects == SET_SUBJECTS for s in result.summaries())


def test_subject_score_is_the_minimum_over_frontal_scans(synthetic_run):
    _, result = synthetic_run
    for s in result.scores:
        assert s.status == "ok" and set(s.scan_scores_mm) == {"frontal1", "frontal2"}
        assert s.score_mm == min(s.scan_scores_mm.values()) == s.scan_scores_mm[s.best_scan]
        assert s.score_mm == pytest.approx((s.gt_to_pred_mm + s.pred_to_gt_mm) / 2)


def test_registration_recovers_the_ground_truth(synthetic_run):
    root, result = synthetic_run
    from benchmarks.synthetic import make_subject
    from facehd.morphable import load_morphable_model

    model = load_morphable_model(_layout(root).template)
    gt = micc.find_ground_truth(_layout(root).gt_dir)
    t = result.template
    cache = root / "micc-registration"
    for scan in gt.scans["subject_01"]:
        registered = micc.register_scan(scan, t, cache_dir=cache)  # from the cache
        truth = make_subject(model, 1).truth_model
        assert micc.micc_score(registered.vertices, truth, t.faces, nose_index=t.nose_tip).score_mm < 0.3
        assert 0.005 < registered.landmark_scale < 0.02  # template units per scan mm


def test_the_registration_cache_has_an_index(synthetic_run):
    root, result = synthetic_run
    cache = root / "micc-registration"
    index = json.loads((cache / micc.REGISTRATION_INDEX).read_text())
    for r in result.registrations:
        entry = index[str(r.scan.mesh_path.resolve())]
        assert entry["subject"] == r.scan.subject and entry["scan"] == r.scan.scan and entry["flags"] == []
        with np.load(cache / entry["cache"]) as data:
            assert np.array_equal(data["vertices"], r.vertices)


def test_workers_are_started_only_for_a_job_big_enough(synthetic_run, monkeypatch, tmp_path):
    root, result = synthetic_run
    layout = _layout(root)

    def no_pool(workers):
        raise AssertionError(f"a pool of {workers} was started for a small job")

    monkeypatch.setattr(micc, "_worker_pool", no_pool)
    gt = tmp_path / "gt"
    shutil.copytree(layout.gt_dir / "subject_02", gt / "subject_02")
    out = micc.evaluate_micc(gt, {"truth": layout.predictions("truth-noise")}, result.template,
                             cache_dir=tmp_path / "cache", workers=4)  # 2 registrations, 6 pairs: in-process
    assert all(s.status == "ok" for s in out.scores) and len(out.registrations) == 2
    assert micc._pool_size(4, 6, micc.MIN_PAIRS_PER_WORKER) == 1
    assert micc._pool_size(4, 20 * micc.MIN_REGISTRATIONS_PER_WORKER, micc.MIN_REGISTRATIONS_PER_WORKER) == 4


def test_missing_predictions_are_reported_not_averaged(synthetic_run, tmp_path):
    root, result = synthetic_run
    layout = _layout(root)
    pred = tmp_path / "pred"
    shutil.copytree(layout.predictions("truth-noise"), pred)
    shutil.rmtree(pred / "subject_02")
    (pred / "subject_01" / "PTZ-Outdoor.obj").unlink()
    shutil.copytree(pred / "subject_01", pred / "subject_99")
    out = micc.evaluate_micc(layout.gt_dir, {"mine": pred}, result.template, cache_dir=root / "micc-registration")
    status = {(s.subject, s.setting): s.status for s in out.scores}
    assert status["subject_02", "Cooperative"] == status["subject_01", "Outdoor"] == "missing"
    assert status["subject_01", "Cooperative"] == "ok"
    n = {s.setting: s.n_subjects for s in out.summaries()}
    assert n == {"Cooperative": 1, "Indoor": 1, "Outdoor": 0}
    table = out.table(published=False)
    assert table.loc["mine", ("Outdoor", "n")] == 0 and np.isnan(table.loc["mine", ("Outdoor", "mean")])
    assert table.loc["mine", ("Cooperative", "mean")] == out.per_subject_frame().query(
        "setting == 'Cooperative' and status == 'ok'")["score_mm"].mean()
    lines = "\n".join(out.not_evaluated())
    assert "subject_02 Cooperative: missing" in lines and "subject_01 Outdoor: missing" in lines
    assert out.extra_predictions == {"mine": ["subject_99"]} and "subject_99" in lines
    assert "Not evaluated" in out.note()


@pytest.mark.parametrize("fault", ["truncated", "nan", "face_index"])
def test_a_bad_first_prediction_is_reported_in_its_cell(synthetic_run, tmp_path, fault):
    root, result = synthetic_run
    layout = _layout(root)
    pred = tmp_path / "pred"
    shutil.copytree(layout.predictions("truth-noise"), pred)
    first = pred / "subject_01" / "Indoor-Cooperative.obj"  # the first file the evaluation reads
    text = first.read_text()
    if fault == "truncated":
        first.write_text(text[: len(text) // 3].rsplit("\n", 1)[0] + "\nv 1.0 2.0\n")
    elif fault == "nan":
        first.write_text(re.sub(r"^v \S+", "v nan", text, count=1, flags=re.MULTILINE))
    else:
        first.write_text(text + f"f 1 2 {len(result.template.vertices) + 5}\n")
    out = micc.evaluate_micc(layout.gt_dir, {"mine": pred}, result.template, cache_dir=root / "micc-registration")
    cells = {(s.subject, s.setting): s for s in out.scores}
    bad = cells["subject_01", "Cooperative"]
    assert bad.status == "error" and str(first) in bad.message
    assert all(s.status == "ok" for k, s in cells.items() if k != ("subject_01", "Cooperative"))
    assert "subject_01 Cooperative: error" in "\n".join(out.not_evaluated())
    assert out.table(published=False).loc["mine", ("Cooperative", "n")] == SET_SUBJECTS - 1


def test_the_default_protocol_is_the_released_one_and_the_note_says_so(synthetic_run):
    _, result = synthetic_run
    assert result.options.protocol == "released" and "Protocol: released" in result.note()
    assert result.registrations and all(r.protocol == "released" and not r.flags for r in result.registrations)
    assert all(r.coverage > micc.MIN_PLAUSIBLE_COVERAGE for r in result.registrations) and not result.warnings()
    frame = result.per_subject_frame()
    assert set(frame["protocol"]) == {"released"} and set(frame["frontal1_registration"]) == {"ok"}
    assert "Protocol: robust" in micc.MiccOptions(protocol="robust").describe(100.0)


def test_a_ground_truth_scan_cut_short_is_flagged(synthetic_run, tmp_path):
    root, result = synthetic_run
    layout = _layout(root)
    gt = tmp_path / "gt"
    shutil.copytree(layout.gt_dir / "subject_01", gt / "subject_01")
    scan = next(s for s in micc.find_ground_truth(gt).scans["subject_01"] if s.scan == "frontal1")
    from facehd.io import load_mesh

    mesh = load_mesh(scan.mesh_path)  # as a file written row by row and cut short: only the top rows remain
    height = mesh.vertices[mesh.faces].mean(axis=1)[:, 1]
    _save(scan.mesh_path, mesh.vertices, mesh.faces[height > np.quantile(height, 0.7)])
    out = micc.evaluate_micc(gt, {"truth": layout.predictions("truth-noise")}, result.template,
                             cache_dir=tmp_path / "cache")
    flagged = [line for line in out.warnings() if "frontal1" in line]
    assert flagged and "covers only" in flagged[0] and str(scan.mesh_path) in flagged[0]
    assert not any("frontal2" in line for line in out.warnings())
    assert "covers only" in out.per_subject_frame()["frontal1_registration"].iloc[0]


def test_cli_prints_published_and_evaluated_rows_in_every_format(synthetic_run, tmp_path):
    root, _ = synthetic_run
    base = ["--cache", str(root), "--synthetic-subjects", str(SET_SUBJECTS),
            "--synthetic-resolution", str(SET_RESOLUTION)]
    runner = CliRunner()
    out = runner.invoke(micc_command, base + ["--per-subject", str(tmp_path / "s.csv"), "--plots", str(tmp_path / "p")])
    assert out.exit_code == 0, out.output
    for name in list(MICC_PUBLISHED) + list(REFERENCE_METHODS):
        assert f"| {name}" in out.stdout
    assert "point-to-surface" in out.stdout and "symmetric" in out.stdout and "template units x 100" in out.stdout
    assert "not comparable to the published rows" in out.stdout and "Protocol: released" in out.stdout
    frame = pd.read_csv(tmp_path / "s.csv")
    assert len(frame) == 3 * SET_SUBJECTS * 3 and set(frame["status"]) == {"ok"}
    pngs = sorted(p.name for p in (tmp_path / "p").glob("*.png"))
    assert "table_bars.png" in pngs and "heatmap_truth-noise_Cooperative.png" in pngs and len(pngs) == 10

    layout = _layout(root)  # the real-data path on the same files, one direction and metric changed
    real = ["--gt", str(layout.gt_dir), "--template", str(layout.template), "--cache", str(root),
            "--pred", f"truth={layout.predictions('truth-noise')}",
            "--pred", f"again={layout.predictions('truth-noise')}",
            "--direction", "gt_to_pred", "--metric", "point_to_plane"]
    latex = runner.invoke(micc_command, real + ["--format", "latex"])
    assert latex.exit_code == 0, latex.output
    assert "\\begin{tabular}" in latex.stdout and "GANFit &" in latex.stdout and "truth &" in latex.stdout
    assert "true point-to-plane" in latex.stdout and "GT -> prediction" in latex.stdout
    after = latex.stdout.split("\\end{tabular}")[1].strip().splitlines()
    assert after and all(line.startswith("%") for line in after)  # the note cannot break a document
    csv = runner.invoke(micc_command, real + ["--format", "csv"])
    assert csv.exit_code == 0, csv.output
    rows = pd.read_csv(io.StringIO(csv.stdout), index_col=0)
    assert list(rows.index) == list(MICC_PUBLISHED) + ["truth", "again"]
    assert rows.loc["truth", "Cooperative n"] == SET_SUBJECTS and "point-to-plane" in csv.stderr
    js = runner.invoke(micc_command, real + ["--format", "json", "--protocol", "robust"])
    assert js.exit_code == 0, js.output
    data = json.loads(js.stdout)
    assert set(data["rows"]) == set(MICC_PUBLISHED) | {"truth", "again"} and "point-to-plane" in data["note"]
    assert "Protocol: robust" in data["note"] and data["warnings"] == []
    assert data["rows"]["truth"] == data["rows"]["again"]
    assert data["rows"]["HRN"]["Cooperative mean"] == 0.86 and data["not_evaluated"] == []


def test_cli_refuses_predictions_in_the_wrong_units(synthetic_run, tmp_path):
    root, result = synthetic_run
    layout = _layout(root)
    pred = tmp_path / "mm" / "subject_01"
    pred.mkdir(parents=True)
    for setting in micc.SETTINGS:
        vertices = micc.load_prediction(layout.predictions("truth-noise") / "subject_01" / f"{setting}.obj",
                                        result.template)
        _save(pred / f"{setting}.obj", vertices * 100.0, result.template.faces)
    args = ["--gt", str(layout.gt_dir), "--template", str(layout.template), "--cache", str(root),
            "--pred", f"mm={tmp_path / 'mm'}"]
    refused = CliRunner().invoke(micc_command, args)
    assert refused.exit_code != 0 and "--units mm" in refused.output
    accepted = CliRunner().invoke(micc_command, args + ["--units", "mm", "--format", "json", "--no-published"])
    assert accepted.exit_code == 0, accepted.output
    data = json.loads(accepted.stdout)
    assert data["rows"]["mm"]["Cooperative n"] == 1 and len(data["not_evaluated"]) == (SET_SUBJECTS - 1) * 3
    assert data["rows"]["mm"]["Cooperative mean"] < 0.5


def test_cli_asks_for_the_missing_real_data_arguments(tmp_path):
    out = CliRunner().invoke(micc_command, ["--gt", str(tmp_path), "--cache", str(tmp_path)])
    assert out.exit_code != 0 and "--pred NAME=DIR" in out.output and "--template" in out.output
    bad = CliRunner().invoke(micc_command, ["--pred", "nodir", "--cache", str(tmp_path)])
    assert bad.exit_code != 0 and "NAME=DIR" in bad.output


def test_plots_are_generic(tmp_path, template, face):
    from benchmarks.plots import plot_error_heatmap, plot_table_bars

    errors = np.linalg.norm(face - face[template.nose_tip], axis=1)
    errors[errors > 0.9] = np.nan  # outside the crop: grey
    heat = plot_error_heatmap(face * 100, template.faces, errors * 10, tmp_path / "heat.png", "errors")
    flat = pd.DataFrame({"nose": [1.722, 1.5], "mouth": [1.357, 1.2]}, index=pd.Index(["HRN", "mine"], name="method"))
    bars = plot_table_bars(flat, tmp_path / "bars.png", "REALY-like", published_rows=["HRN"])
    for path in (heat, bars):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="per-vertex values"):
        plot_error_heatmap(face, template.faces, errors[:-1], tmp_path / "bad.png", "bad")


def test_a_prediction_with_per_corner_uvs_keeps_the_file_vertices(tmp_path, template, face):
    # one UV per face corner: the OBJ reader splits every shared vertex; the prediction must not be
    corners = template.faces.reshape(-1)
    lines = [f"v {x!r} {y!r} {z!r}" for x, y, z in face.tolist()]
    lines += [f"vt {k / len(corners)!r} 0.5" for k in range(len(corners))]
    lines += [f"f {a + 1}/{3 * i + 1} {b + 1}/{3 * i + 2} {c + 1}/{3 * i + 3}"
              for i, (a, b, c) in enumerate(template.faces)]
    path = tmp_path / "uv.obj"
    path.write_text("\n".join(lines) + "\n")
    assert_close(micc.load_prediction(path, template), face, atol=0)
