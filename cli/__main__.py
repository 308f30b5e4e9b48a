"""``python -m rgs_cli`` (installed) or ``python -m cli`` (from a source checkout)."""
from .main import app

app(prog_name="rgs")
