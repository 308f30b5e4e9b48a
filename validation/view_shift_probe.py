"""Issue 19's moved-patient check, offline: the views' whole-window shifts along their shared
axis (:mod:`rgs_engine.registration.consistency`) at the stored poses of a ``registration.py``
run, computed as ``register`` computes them (its window, pitch and reach; the X-rays made
again as the sweep made them, the Gaussians from this device's cache), so a bound can be
chosen and checked on runs that predate the check. Prints and saves, per trial, each view's
translation (mm) and their disagreement.

Usage::

    python validation/view_shift_probe.py RESULTS.json[.gz] group:bin:trial,... OUT.json
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import registration as sweep  # validation/ (this folder is on sys.path when run)
import registration_confidence as rc
import torch

from rgs_engine.core import rigid, runtime
from rgs_engine.registration import consistency, levels, register as reg
from rgs_engine.registration.masking import exposure_mask
from rgs_engine.registration.windows import Crop


def main(argv: list[str]) -> int:
    results, specs, out_path = Path(argv[0]), argv[1].split(","), Path(argv[2])
    runtime.init("cpu")
    res = sweep.load_results(results)
    scene = rc.Scene(res, sweep.ROOT / ".cache" / "registration")
    out = []
    for spec in specs:
        rec = scene.record(spec)
        t0 = time.time()
        xs, case, pose = scene.xrays(rec), scene.case(rec["label"]), np.array(rec["pose"])
        gauss, means, centre, images = rc.register_inputs(xs, case)
        centre_x = rigid.apply(pose, centre)
        pitch = levels.object_pitch(xs.geometry, centre)  # as register's, at its (identity) start
        crop = Crop.around(xs.geometry, rigid.apply(pose, means), reg.CONSISTENCY_MARGIN_MM / pitch)
        wide = levels.Level(max(1, round(reg.CONSISTENCY_PITCH_MM / pitch)), xs.geometry, images, exposure_mask(images),
                          crop, gauss, centre, 0.5)
        with torch.no_grad():
            drr = wide.drr(*rigid.rigid_transform_gaussians(wide.means, wide.quats,
                                                            torch.as_tensor(pose, dtype=torch.float32)))
        shifts, disagreement = consistency.measure(drr, wide.raw, wide.weights, wide.geometry, centre_x,
                                                   reg.CONSISTENCY_REACH_MM)
        out.append({"spec": spec, "name": rec["name"], "mtre": rec["mtre_mm"], "flag": rec["flagged_success"],
                    "wrong": rec["wrong_input"], "right": rec["success"], "view_shifts_mm": shifts.tolist(),
                    "view_shift_mm": disagreement})
        print(f"{spec:24s} {rec['name']:>4} mTRE {rec['mtre_mm']:5.2f} right {int(rec['success'])} "
              f"flagged {int(rec['flagged_success'])} view shift {disagreement:5.2f} mm [{time.time() - t0:.0f} s]",
              flush=True)
        out_path.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
