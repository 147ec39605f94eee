"""The face-landmark detector's worker: runs inside the detector's own environment (.venv-detect,
`bash scripts/setup.sh --detect`: mediapipe 0.10.21, numpy < 2), never in the main one.

It imports nothing from facehd (whose code needs numpy 2): `facehd.landmarks_detect` starts it as
``python facehd/mediapipe_landmarks.py`` and maps its 468 points to iBUG 68.

Protocol: image paths on stdin, one per line; for each, one JSON line on stdout, in order:
``{"points": [[x, y], ...], "seconds": s}`` (468 MediaPipe Face Mesh points in pixels, x right,
y down, origin at the centre of the top-left pixel) or ``{"error": "...", "seconds": s}`` (s: the
decoding and detection time), then ``{"done": true}``. Images are decoded as facehd reads them
(Pillow, converted to RGB, EXIF orientation ignored).
"""

from __future__ import annotations

import json
import os
import sys
import time

# A face is accepted at this detector score (MediaPipe's default).
MIN_DETECTION_CONFIDENCE = 0.5


def _read_rgb(path: str):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.ascontiguousarray(np.asarray(image.convert("RGB")))


def main() -> int:
    # replies go to the original stdout; anything the native libraries print goes to stderr
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    import mediapipe as mp  # the legacy Face Mesh solution: its models ship inside the 0.10.21 wheel

    mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=False,
                                           min_detection_confidence=MIN_DETECTION_CONFIDENCE)
    try:
        for line in sys.stdin:
            path = line.rstrip("\n")
            if not path:
                continue
            start = time.perf_counter()
            try:
                rgb = _read_rgb(path)
            except Exception as exc:  # noqa: BLE001 - any decoding failure is this image's problem
                reply = {"error": f"cannot decode image: {exc}"}
            else:
                height, width = rgb.shape[:2]
                found = mesh.process(rgb).multi_face_landmarks
                if not found:
                    reply = {"error": "no face found by the detector"}
                else:
                    # normalised coordinates: 0 and 1 are the image's outer edges
                    reply = {"points": [[p.x * width - 0.5, p.y * height - 0.5] for p in found[0].landmark]}
            reply["seconds"] = time.perf_counter() - start
            replies.write(json.dumps(reply) + "\n")
            replies.flush()
    finally:
        mesh.close()
    replies.write(json.dumps({"done": True}) + "\n")
    replies.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
