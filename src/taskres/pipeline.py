"""The former name of ``taskres.workflow``, kept so that existing imports keep working."""

from taskres.workflow import *  # noqa: F401,F403
from taskres.workflow import __all__  # noqa: F401
