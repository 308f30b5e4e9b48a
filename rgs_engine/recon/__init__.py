"""Static reconstruction: radiative Gaussians (:mod:`.gaussian`), FDK (:mod:`.fdk`) and
OS-SART (:mod:`.sart`), all on the same geometry model and kernels."""
