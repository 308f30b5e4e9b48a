"""Issue 19's combined scans, offline: the decision each variant of the combined-scan rule
would take on a ``registration.py`` run's stored poses, from ``combined_scans_probe.py``'s
scans. The view disagreement becomes the larger of the stored one and the structure's
displacement under each counting combined peak; the estimate and the decision are recomputed
from the stored evidence (the scans only add to it, so a refused pose stays refused). The
counting rule is the decision's own (``confidence._constrains``, ``_in_plane``) with each
variant's fractions. Without SCANS.json the scans are each trial's own, from its evidence
(``scans``: runs since 2026-12-07, scanned on the device that registered), for every trial.

Usage::

    python validation/combined_scans_rules.py RESULTS.json [SCANS.json]
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import registration as sweep  # validation/ (this folder is on sys.path when run)

from rgs_engine.core import rigid
from rgs_engine.registration import confidence as cf, report

# name -> (axis fraction, gain fraction, which directions: "combined" / "in-plane" combined / "all" 18)
VARIANTS = {"diag(0.1,0.25) in-plane t": (0.1, 0.25, "in-plane"), "diag(0.1,0.3) in-plane t": (0.1, 0.3, "in-plane"),
            "diag(0.1,0.2) in-plane t": (0.1, 0.2, "in-plane"), "diag(0.1,0.1) in-plane t": (0.1, 0.1, "in-plane"),
            "diag(0.1,0.05) in-plane t": (0.1, 0.05, "in-plane"), "diag(0.1,0.05)": (0.1, 0.05, "combined"),
            "diag(0.1,0.2)": (0.1, 0.2, "combined"), "diag(0.1,0.1)": (0.1, 0.1, "combined"),
            "diag(0.15,0.05)": (0.15, 0.05, "combined"), "all18(0.1,0.05)": (0.1, 0.05, "all")}


def main(argv: list[str]) -> int:
    res = sweep.load_results(Path(argv[0]))
    recs = {f"{x['group']}:{x['bin'][0]:g}:{x['trial']}": x for x in res["trials"]}
    rows = json.loads(Path(argv[1]).read_text()) if len(argv) > 1 else [
        {"spec": spec, "names": x["evidence"]["scans"]["directions"], "span": x["evidence"]["scans"]["span"],
         "gain": x["evidence"]["scans"]["gain"], "peak": x["evidence"]["scans"]["peak_mm"]}
        for spec, x in recs.items() if "scans" in x["evidence"]]
    scale = np.array([math.radians(cf.SCAN_DEG_PER_MM)] * 3 + [1.0] * 3)
    order = cf.scan_direction_names()  # the decision's direction order: 6 axes, then 12 combined
    directions = cf._scan_directions() * scale
    points = {}
    for name, (fraction, gain_fraction, which) in VARIANTS.items():
        stats = dict.fromkeys(("right_flag_before", "right_flag_after", "right", "wrong_flag_before",
                               "wrong_flag_after", "wrong"), 0)
        lost, caught = [], []
        for r in rows:
            x = recs[r["spec"]]
            if x["label"] not in points:
                p = report.target_points(sweep.CT, sweep.MASK, x["label"])
                points[x["label"]] = p[np.random.default_rng(0).choice(len(p), min(len(p), cf.MAX_POINTS), replace=False)]
            pts_x = rigid.apply(np.array(x["pose"]), points[x["label"]])
            idx = [r["names"].index(n) for n in order]
            span, gain, peak = (np.array(r[k])[idx] for k in ("span", "gain", "peak"))  # (18, V)
            counts = cf._constrains(span, fraction) & (gain >= gain_fraction * span) & (span > 0)
            if which == "in-plane":
                counts[6:] &= cf._in_plane(span[3:6])
            if which != "all":
                counts[:6] = False
            view = max([0.0] + [cf._displacement(peak[k, v] * directions[k], pts_x, pts_x.mean(axis=0))
                                for k, v in zip(*np.nonzero(counts))])
            ev = x["evidence"]
            est = math.sqrt(ev["restart_spread_mm"] ** 2 + ev["peak_offset_mm"] ** 2
                            + max(ev["view_disagreement_mm"], view) ** 2 + ev.get("rival_basin_mm", 0) ** 2)
            after = x["flagged_success"] and est <= cf.MAX_ERROR_MM
            kind = "wrong" if x["wrong_input"] or not x["success"] else "right"
            stats[kind] += 1
            stats[f"{kind}_flag_before"] += x["flagged_success"]
            stats[f"{kind}_flag_after"] += after
            if x["flagged_success"] and not after:
                (caught if kind == "wrong" else lost).append(
                    (r["spec"], x["name"], round(x["mtre_mm"], 2), round(x["estimated_error_mm"], 2), round(est, 2)))
        print(name, stats, "\n   caught", caught, "\n   lost", lost)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
