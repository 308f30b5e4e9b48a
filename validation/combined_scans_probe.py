"""Issue 19's combined scans, offline: each view of chosen trials of a ``registration.py`` run
scanned at the trial's stored pose along the 18 directions of the success decision's 1-D scans
(:func:`rgs_engine.registration.confidence._scan_directions`: the 6 axes and the 12
shift-with-tilt combinations), with the decision's own probe rebuilt on this device
(``registration_confidence.probe_score``). Per trial and view: each direction's similarity
range (span), the gain of the view's own maximum over the pose, and that maximum's offset (mm
equivalent), saved as JSON for ``combined_scans_rules.py``. (Runs of ``registration.py`` since
2026-12-07 keep the same statistics of the device's own scans in each trial's evidence,
``scans``, where ``combined_scans_rules.py`` reads them without this probe.)

Usage::

    python validation/combined_scans_probe.py RESULTS.json group:bin:trial,... OUT.json
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import registration as sweep  # validation/ (this folder is on sys.path when run)
import registration_confidence as rc

from rgs_engine.core import runtime
from rgs_engine.registration import confidence as cf


def main(argv: list[str]) -> int:
    results, specs, out_path = Path(argv[0]), argv[1].split(","), Path(argv[2])
    runtime.init("cpu")
    res = sweep.load_results(results)
    scene = rc.Scene(res, sweep.ROOT / ".cache" / "registration")
    offsets = np.arange(-cf.SCAN_MM, cf.SCAN_MM + 1e-9, cf.SCAN_STEP_MM)
    scale = np.array([np.radians(cf.SCAN_DEG_PER_MM)] * 3 + [1.0] * 3)
    directions, names = cf._scan_directions() * scale, cf.scan_direction_names()
    out = []
    for spec in specs:
        rec = scene.record(spec)
        t0 = time.time()
        xs, case, pose = scene.xrays(rec), scene.case(rec["label"]), np.array(rec["pose"])
        score, points = rc.probe_score(xs, case, pose)
        pts = points[np.random.default_rng(0).choice(len(points), min(len(points), cf.MAX_POINTS), replace=False)]
        xis = directions[:, None, :] * offsets[None, :, None]
        scan = cf._moved_about([pose] * xis.shape[0] * xis.shape[1], xis.reshape(-1, 6), pts.mean(axis=0))
        prof = np.asarray(score(scan), dtype=np.float64).reshape(len(directions), len(offsets), -1)  # (D, S, V)
        span, gain, peak = cf._scan_stats(prof, offsets)
        out.append({"spec": spec, "name": rec["name"], "mtre": rec["mtre_mm"], "flag": rec["flagged_success"],
                    "wrong": rec["wrong_input"], "right": rec["success"], "names": names,
                    "span": span.tolist(), "gain": gain.tolist(), "peak": peak.tolist()})
        print(f"{spec:24s} {rec['name']:>4} mTRE {rec['mtre_mm']:5.2f} flagged {int(rec['flagged_success'])} "
              f"wrong input {int(rec['wrong_input'])} [{time.time() - t0:.0f} s]", flush=True)
        out_path.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
