"""Simulation: CT to attenuation (:mod:`.ct`), phantoms, static scans (:mod:`.scan`),
breathing motion and free-breathing scans (:mod:`.breathing`, :mod:`.breathing_scan`) and
synthetic contrast-filled vessel trees (:mod:`.vessels`), detector-like radiographs from
DRRs (:mod:`.radiograph`)."""
