"""Motion over time: continuous-time breathing reconstruction (:mod:`.track4d`), its
deformation models (:mod:`.deformation`), the projections' own breathing period
(:mod:`.period_estimate`) and contrast inflow in DSA vessels (:mod:`.dsa`)."""
