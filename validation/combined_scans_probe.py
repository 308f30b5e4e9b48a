"""Per view, 1-D scans along combined directions (translation i + rotation j, i != j, both
signs) through the stored pose, with the probe of the confidence: span, gain, peak offset.
Usage: python validation/combined_scans_probe.py RESULTS.json group:bin:trial,... OUT.json"""
import sys, json, math, time
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import numpy as np
import registration_confidence as rc, registration as sweep
from rgs_engine.core import runtime
from rgs_engine.registration import confidence as cf
runtime.init("cpu")
res = json.load(open(sys.argv[1])); scene = rc.Scene(res, sweep.ROOT / ".cache" / "registration")
specs = sys.argv[2].split(",")
out = []
offsets = np.arange(-cf.SCAN_MM, cf.SCAN_MM + 1e-9, cf.SCAN_STEP_MM)
scale = np.array([math.radians(cf.SCAN_DEG_PER_MM)] * 3 + [1.0] * 3)
dirs, names = [], []
for ti in range(3):
    for rj in range(3):
        if ti == rj: continue
        for sg in (1, -1):
            d = np.zeros(6); d[3 + ti] = 1 / math.sqrt(2); d[rj] = sg / math.sqrt(2); dirs.append(d); names.append(f"t{'xyz'[ti]}{'+' if sg > 0 else '-'}r{'xyz'[rj]}")
for i in range(6):
    d = np.zeros(6); d[i] = 1; dirs.append(d); names.append(("rx", "ry", "rz", "tx", "ty", "tz")[i])
dirs = np.array(dirs)
for spec in specs:
    g, lo, j = spec.split(":")
    rec = [r for r in res["trials"] if r["group"] == g and r["bin"][0] == float(lo) and r["trial"] == int(j)][0]
    t0 = time.time()
    xs = scene.xrays(rec); case = scene.case(rec["label"]); pose = np.array(rec["pose"])
    score, points = rc.probe_score(xs, case, pose)
    pts = points[np.random.default_rng(0).choice(len(points), min(len(points), cf.MAX_POINTS), replace=False)]
    centre = pts.mean(0)
    xis = (dirs * scale)[:, None, :] * offsets[None, :, None]
    scan = cf._moved_about([pose] * xis.shape[0] * xis.shape[1], xis.reshape(-1, 6), centre)
    prof = np.asarray(score(scan), dtype=np.float64).reshape(len(dirs), len(offsets), -1)
    span = prof.max(1) - prof.min(1); at0 = prof[:, len(offsets) // 2]; gain = prof.max(1) - at0
    peak = offsets[prof.argmax(1)]
    row = {"spec": spec, "name": rec["name"], "mtre": rec["mtre_mm"], "flag": rec["flagged_success"], "wrong": rec["wrong_input"],
           "right": rec["success"], "names": names, "span": span.tolist(), "gain": gain.tolist(), "peak": peak.tolist()}
    out.append(row)
    # summary: per view, the largest gain fraction among directions whose span >= f * other view's span
    summ = []
    for v in range(2):
        o = 1 - v
        best = max(((gain[k, v] / span[k, v] if span[k, v] > 0 else 0, span[k, v] / max(span[k, o], 1e-9), peak[k, v], names[k]) for k in range(len(dirs))), key=lambda z: z[0])
        summ.append(f"{('AP','LAT')[v]} best gainfrac {best[0]:.2f} (spanratio {best[1]:.2f}, peak {best[2]:+.0f}, {best[3]})")
    print(f"{spec:24s} {rec['name']:>4} mTRE {rec['mtre_mm']:5.2f} flag {int(rec['flagged_success'])} wrong {int(rec['wrong_input'])} | " + " | ".join(summ) + f" [{time.time()-t0:.0f}s]", flush=True)
    json.dump(out, open(sys.argv[3], "w"))
