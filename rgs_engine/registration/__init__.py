"""Rigid CT-to-X-ray registration: a CT as radiative Gaussians (:mod:`.ct_gaussians`) and
the global + coarse-to-fine SE(3) search over it (:mod:`.register`)."""
