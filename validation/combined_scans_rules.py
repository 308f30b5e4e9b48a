"""Offline check of the confidence's combined scans: the decision each rule
would take on a sweep's stored poses, from the scans of validation/combined_scans_probe.py.
Usage: python validation/combined_scans_rules.py RESULTS.json SCANS.json"""
import json, sys, math, numpy as np
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import registration as sweep
from rgs_engine.core import rigid
from rgs_engine.registration import report, confidence as cf
res = json.load(open(sys.argv[1])); rows = json.load(open(sys.argv[2]))
recs = {f"{x['group']}:{x['bin'][0]:g}:{x['trial']}": x for x in res["trials"]}
pts_cache = {}
scale = np.array([math.radians(cf.SCAN_DEG_PER_MM)] * 3 + [1.0] * 3)
def dirvec(n):
    d = np.zeros(6)
    if len(n) == 2:
        d[("rx", "ry", "rz", "tx", "ty", "tz").index(n)] = 1; return d
    d[3 + "xyz".index(n[1])] = 1 / math.sqrt(2); d["xyz".index(n[4])] = (1 if n[2] == "+" else -1) / math.sqrt(2); return d
variants = {"V8 diag(0.1,0.25) in-plane t": (0.1, 0.25, "inplane"), "V9 diag(0.1,0.3) in-plane t": (0.1, 0.3, "inplane"), "V5 diag(0.1,0.2) in-plane t": (0.1, 0.2, "inplane"), "V6 diag(0.1,0.1) in-plane t": (0.1, 0.1, "inplane"), "V7 diag(0.1,0.05) in-plane t": (0.1, 0.05, "inplane"), "V1 diag(0.1,0.05)": (0.1, 0.05, False), "V2 diag(0.1,0.2)": (0.1, 0.2, False), "V2b diag(0.1,0.1)": (0.1, 0.1, False),
            "V4 diag(0.15,0.05)": (0.15, 0.05, False), "V3 all18(0.1,0.05)": (0.1, 0.05, True)}
for name, (f, gmin, alld) in variants.items():
    stats = {"right_flag_before": 0, "right_flag_after": 0, "right": 0, "wrong_flag_before": 0, "wrong_flag_after": 0, "wrong": 0}
    lost, caught = [], []
    for r in rows:
        x = recs[r["spec"]]
        lb = x["label"]
        if lb not in pts_cache:
            p = report.target_points(sweep.CT, sweep.MASK, lb); pts_cache[lb] = p[np.random.default_rng(0).choice(len(p), min(len(p), cf.MAX_POINTS), replace=False)]
        pose = np.array(x["pose"]); pts_x = rigid.apply(pose, pts_cache[lb]); cx = pts_x.mean(0)
        span, gain, peak = np.array(r["span"]), np.array(r["gain"]), np.array(r["peak"])
        vm = 0.0
        for k, n in enumerate(r["names"]):
            if len(n) == 2 and alld is not True: continue
            for v in range(2):
                o = 1 - v
                if alld == "inplane":
                    ti = r["names"].index("t" + n[1])
                    if span[ti, v] < cf.VIEW_AXIS_FRACTION * span[ti, o]: continue
                if span[k, v] > 0 and span[k, v] >= f * span[k, o] and gain[k, v] >= gmin * span[k, v]:
                    vm = max(vm, cf._displacement(peak[k, v] * dirvec(n) * scale, pts_x, cx))
        ev = x["evidence"]
        old_view = ev["view_disagreement_mm"]
        est = math.sqrt(ev["restart_spread_mm"] ** 2 + ev["peak_offset_mm"] ** 2 + max(old_view, vm) ** 2 + ev.get("rival_basin_mm", 0) ** 2)
        after = x["flagged_success"] and est <= cf.MAX_ERROR_MM
        if x["wrong_input"] or not x["success"]:
            stats["wrong"] += 1; stats["wrong_flag_before"] += x["flagged_success"]; stats["wrong_flag_after"] += after
            if x["flagged_success"] and not after: caught.append((r["spec"], x["name"], round(x["mtre_mm"], 2), round(est, 2)))
        else:
            stats["right"] += 1; stats["right_flag_before"] += x["flagged_success"]; stats["right_flag_after"] += after
            if x["flagged_success"] and not after: lost.append((r["spec"], x["name"], round(x["mtre_mm"], 2), round(x["estimated_error_mm"], 2), round(est, 2)))
    print(name, stats, "\n   caught", caught, "\n   lost", lost)
