"""rgs command-line interface (installed as the ``rgs_cli`` package; console script ``rgs``)."""
