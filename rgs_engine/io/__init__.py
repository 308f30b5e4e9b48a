"""Readers and writers: rgs projection files (.h5), R2-Gaussian folders and NAF pickles
(:mod:`.projections`), X2-Gaussian 4D pickles (:mod:`.naf4d`), 4DRGS DSA cases
(:mod:`.dsa_case`), X-ray folders (:mod:`.xrays`), NIfTI volumes and atomic file writes
(:mod:`.files`), pictures (:mod:`.images`) and meshes (:mod:`.mesh`)."""
