"""Rigid CT-to-X-ray registration: a CT as radiative Gaussians (:mod:`.ct_gaussians`) and
the global + coarse-to-fine SE(3) search over it (:mod:`.register`) in detector windows
(:mod:`.windows`), with masks and contrast matching for real radiographs (:mod:`.masking`,
:mod:`.similarity`), the success decision and error estimate (:mod:`.confidence`), and the
target points and overlay picture it reports (:mod:`.report`)."""
