"""sftdata: prepare supervised fine-tuning data with exact assistant-only label masks.

The Python API has the names of the CLI commands::

    import sftdata
    result = sftdata.build(["data.jsonl"], template="chatml", output="sftdata-out")
    result = sftdata.build(config="recipe.yaml")                      # or sftdata.build(sftdata.Recipe(...))
    sftdata.show("sftdata-out", row=0)
"""

__version__ = "0.1.0"

# The functions shadow their submodules' names on purpose (sftdata.build is the function); the modules stay
# importable as `from sftdata.build import ...`.
from sftdata.build import build  # noqa: E402
from sftdata.clean import decontaminate, dedup  # noqa: E402
from sftdata.recipe import Recipe, Source  # noqa: E402
from sftdata.show import show  # noqa: E402
from sftdata.verify import verify  # noqa: E402


__all__ = ["build", "show", "verify", "dedup", "decontaminate", "Recipe", "Source", "__version__"]
# Training needs the `train` extra (torch): `from sftdata.train import train`.
