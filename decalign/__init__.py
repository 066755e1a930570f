"""decalign: decoding-time alignment of language models (CARDS, CoLD, Best-of-N, ...)."""

__version__ = "0.1.0"  # first: modules imported below may read it

from .api import generate, run, run_together
from .engine import Batch, Engine, EntropyStop, Segment, get_engine
from .errors import DecalignError
from .methods import method_names
from .request import Request
from .result import Candidate, Result
from .rewards import Reward, load_reward
from .sampling import Sampling

__all__ = [
    "generate", "run", "run_together", "Request", "get_engine", "Engine", "Batch", "EntropyStop", "Segment", "DecalignError",
    "method_names", "Result", "Candidate", "Reward", "load_reward", "Sampling", "__version__",
]
