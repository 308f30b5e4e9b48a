"""Record which value checks (``check_params(values=...)``: a host sync each on a GPU) the
splat and voxelisation calls of a block of code ask for."""
from rgs_engine.core import splatting, voxelization


def record_value_checks(monkeypatch) -> list[bool]:
    """From now on, every ``check_params`` call of ``splat`` / ``voxelize`` appends whether it
    checked values (``values``) to the returned list; the calls go through unchanged."""
    asked: list[bool] = []
    for module in (splatting, voxelization):
        original = module.check_params

        def recording(*args, _original=original, **kwargs):
            asked.append(kwargs.get("values", True))
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, "check_params", recording)
    return asked
