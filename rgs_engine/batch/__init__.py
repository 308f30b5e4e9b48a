"""Cohorts of rgs jobs on Ray (``rgs batch``): a manifest of jobs (:mod:`.manifest`), run one
Ray task per job through the pipeline API (:mod:`.execution`), one results table and a
summary figure (:mod:`.results`); :func:`.runner.batch` ties them together. Ray is an
optional extra: ``pip install "rgs[batch]"``."""
from .manifest import Job, ManifestError, Row  # noqa: F401
from .execution import Outcome  # noqa: F401
from .runner import BatchResult, batch, check  # noqa: F401
