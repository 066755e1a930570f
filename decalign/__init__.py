"""decalign: decoding-time alignment of language models (CARDS, CoLD, Best-of-N, ...).

The public names load their modules (and torch with them) when first used, not when the package is
imported: the `decalign` command starts without torch until a command needs it, so a Ctrl-C in its
first second is one line, as it is later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_names

__version__ = "0.1.0"

_HOMES = {  # public name -> the module that defines it
    "generate": ".api", "run": ".api", "run_together": ".api", "Batch": ".engine", "Engine": ".engine",
    "EntropyStop": ".engine", "Segment": ".engine", "get_engine": ".engine", "DecalignError": ".errors",
    "method_names": ".methods", "Request": ".request", "Candidate": ".result", "Result": ".result",
    "Reward": ".rewards", "load_reward": ".rewards", "Sampling": ".sampling",
}

__all__ = [
    "generate", "run", "run_together", "Request", "get_engine", "Engine", "Batch", "EntropyStop", "Segment",
    "DecalignError", "method_names", "Result", "Candidate", "Reward", "load_reward", "Sampling", "__version__",
]

if TYPE_CHECKING:  # what type checkers and editors see
    from .api import generate, run, run_together
    from .engine import Batch, Engine, EntropyStop, Segment, get_engine
    from .errors import DecalignError
    from .methods import method_names
    from .request import Request
    from .result import Candidate, Result
    from .rewards import Reward, load_reward
    from .sampling import Sampling

__getattr__ = lazy_names(__name__, _HOMES)
